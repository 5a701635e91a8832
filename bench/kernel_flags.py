"""Command-line flags of the bench scripts that choose kernel settings (`kernels.KernelSettings`)."""

from __future__ import annotations

import argparse
import dataclasses

from kernels.settings import COMPRESSED_IMPLS, SELECTED_IMPLS, SLIDING_IMPLS, KernelSettings, SelectedSettings, \
    SelectionSettings


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


def kernel_settings_from(args: argparse.Namespace) -> KernelSettings:
    default = KernelSettings()
    selected = SelectedSettings(
        impl=args.selected_impl or default.selected.impl,
        tile_rows=args.tile_rows or default.selected.tile_rows)
    return KernelSettings(selected=selected, selection=SelectionSettings(
                              rows=args.selection_rows or default.selection.rows,
                              block_keys=args.selection_block_keys or default.selection.block_keys,
                              num_warps_dbk=args.selection_warps_dbk or default.selection.num_warps_dbk),
                          sliding_impl=args.sliding_impl or default.sliding_impl,
                          compressed_impl=args.compressed_impl or default.compressed_impl)


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
