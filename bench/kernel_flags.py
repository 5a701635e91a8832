"""Command-line flags of the bench scripts that choose kernel settings (`kernels.KernelSettings`)."""

from __future__ import annotations

import argparse
import collections
import dataclasses

from kernels.settings import COMPRESSED_IMPLS, SELECTED_IMPLS, SLIDING_IMPLS, KernelSettings


def add_kernel_flags(parser: argparse.ArgumentParser) -> None:
    """--selected_impl, --tile_rows, --selection_rows, --selection_block_keys,
    --selection_warps_dbk, --sliding_impl, --compressed_impl (default: the library's)."""
    group = parser.add_argument_group("kernel settings (default: the library's measured choices)")
    group.add_argument("--selected_impl", default=None, choices=SELECTED_IMPLS, help="selected-attention kernels")
    group.add_argument("--tile_rows", type=int, default=None, help="rows per tile of the tiled selected kernels")
    group.add_argument("--selection_rows", type=int, default=None, help="query rows per selection kernel tile")
    group.add_argument("--selection_block_keys", type=int, default=None, help="block keys per selection step")
    group.add_argument("--selection_warps_dbk", type=int, default=None,
                       help="warps of the selection's d(block keys) kernel (default: by head dim)")
    group.add_argument("--sliding_impl", default=None, choices=SLIDING_IMPLS, help="sliding-window kernel")
    group.add_argument("--compressed_impl", default=None, choices=COMPRESSED_IMPLS, help="compressed-branch kernel")
    group.add_argument("--kernel_settings", default="", metavar="GROUP.FIELD=VALUE,...",
                       help="any setting, e.g. flash.min_dkv_tiles_per_program=2 (groups: selected, "
                            "selection, flash, mosaic); the flags above override it")


def kernel_settings_from(args: argparse.Namespace) -> KernelSettings:
    """The settings these flags give: --kernel_settings on the library's defaults, then the named flags."""
    base = parse_variant(getattr(args, "kernel_settings", ""))
    selected = dataclasses.replace(base.selected, impl=args.selected_impl or base.selected.impl,
                                   tile_rows=args.tile_rows or base.selected.tile_rows)
    selection = dataclasses.replace(base.selection, rows=args.selection_rows or base.selection.rows,
                                    block_keys=args.selection_block_keys or base.selection.block_keys,
                                    num_warps_dbk=args.selection_warps_dbk or base.selection.num_warps_dbk)
    return dataclasses.replace(base, selected=selected, selection=selection,
                               sliding_impl=args.sliding_impl or base.sliding_impl,
                               compressed_impl=args.compressed_impl or base.compressed_impl)


def replace_fields(settings, items: list[str]):
    """A settings dataclass with `name=value` items applied, each value parsed by its field's
    default (bool: 1/true/yes; str; otherwise int). Unknown names exit with a one-line error."""
    fields = [f.name for f in dataclasses.fields(settings)]
    changes = {}
    for item in items:
        name, _, value = item.partition("=")
        name, value = name.strip(), value.strip()
        if name not in fields:
            raise SystemExit(f"error: unknown {type(settings).__name__} field {name!r} (fields: {', '.join(fields)})")
        default = getattr(settings, name)
        if isinstance(default, bool):
            changes[name] = value.lower() in ("1", "true", "yes")
        elif isinstance(default, str):
            changes[name] = value
        else:
            changes[name] = int(value)
    return dataclasses.replace(settings, **changes)


GROUPS = ("selected", "selection", "flash", "mosaic")


def parse_variant(text: str, settings: KernelSettings | None = None) -> KernelSettings:
    """'group.field=value,...' applied to `settings` (default KernelSettings()); bools and ints
    where the field's default is one; "" or "default": unchanged."""
    settings = KernelSettings() if settings is None else settings
    if text.strip() in ("", "default"):
        return settings
    top, by_group = [], collections.defaultdict(list)
    for item in text.split(","):
        group, dot, field = item.strip().partition(".")
        if not dot:  # a top-level field (sliding_impl)
            if item.partition("=")[0].strip() in GROUPS:
                raise SystemExit(f"error: use group.field for {', '.join(GROUPS)}, got {item.strip()!r}")
            top.append(item)
        elif group not in GROUPS:
            raise SystemExit(f"error: unknown settings group {group!r} (groups: {', '.join(GROUPS)})")
        else:
            by_group[group].append(field)
    settings = replace_fields(settings, top)
    return dataclasses.replace(settings, **{g: replace_fields(getattr(settings, g), items)
                                            for g, items in by_group.items()})
