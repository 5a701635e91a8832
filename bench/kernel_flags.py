"""Command-line flags of the bench scripts that choose kernel settings (`kernels.KernelSettings`)."""

from __future__ import annotations

import argparse

from kernels.settings import SELECTED_IMPLS, SLIDING_IMPLS, TOPK_IMPLS, KernelSettings, SelectedSettings, \
    SelectionSettings


def add_kernel_flags(parser: argparse.ArgumentParser) -> None:
    """--selected_impl, --tile_rows, --topk, --sliding_impl (default: the library's)."""
    group = parser.add_argument_group("kernel settings (default: the library's measured choices)")
    group.add_argument("--selected_impl", default=None, choices=SELECTED_IMPLS, help="selected-attention kernels")
    group.add_argument("--tile_rows", type=int, default=None, help="rows per tile of the tiled selected kernels")
    group.add_argument("--topk", default=None, choices=TOPK_IMPLS, help="selection top-k")
    group.add_argument("--sliding_impl", default=None, choices=SLIDING_IMPLS, help="sliding-window kernel")


def kernel_settings_from(args: argparse.Namespace) -> KernelSettings:
    default = KernelSettings()
    selected = SelectedSettings(
        impl=args.selected_impl or default.selected.impl,
        tile_rows=args.tile_rows or default.selected.tile_rows)
    return KernelSettings(selected=selected, selection=SelectionSettings(args.topk or default.selection.topk),
                          sliding_impl=args.sliding_impl or default.sliding_impl)
