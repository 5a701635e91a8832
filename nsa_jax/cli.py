"""Command-line plumbing shared by train.py and sample.py: absl flags with --help, one-line errors.

absl handles --help only inside `absl.app.run`, which exits 1 after the help and after a flag
error (two lines). The scripts parse their flags with `parse_flags` instead:

    --help, -h, --helpshort   the program's docstring and its own flags (stdout, exit 0)
    --helpfull                every flag, the libraries' included (stdout, exit 0)
    a flag error              `error: ... (see python train.py --help)` on stderr, exit 2

Nothing here imports jax (importing `nsa_jax.cli` still runs the package's `__init__`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import ModuleType
from typing import NoReturn

from absl import flags


def fail(message: str, status: int = 2) -> NoReturn:
    """A user error: one line on stderr, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


class _HelpRequested(Exception):
    """Raised out of `flags.FLAGS(argv)` by a help flag (absl does not catch it)."""

    def __init__(self, full: bool):
        self.full = full


class _HelpFlag(flags.BooleanFlag):
    """A boolean flag that stops parsing when set: a flag, not a scan of argv, so that
    `--prime -h` stays a value and --help in a flagfile still counts."""

    def __init__(self, name: str, help: str, short_name: str | None = None, full: bool = False):
        super().__init__(name, False, help, short_name=short_name)
        self.full = full

    def parse(self, argument: str) -> None:
        super().parse(argument)
        if self.value:
            raise _HelpRequested(self.full)


# absl.app defines flags of these names only inside app.run, which these scripts do not call.
flags.DEFINE_flag(_HelpFlag("help", "this program's flags", short_name="h"))
flags.DEFINE_flag(_HelpFlag("helpshort", "same as --help"))
flags.DEFINE_flag(_HelpFlag("helpfull", "every flag, the libraries' included", full=True))


def parse_flags(argv: list[str], program: ModuleType) -> None:
    """Parse `argv` into `flags.FLAGS` for `program` (the script's module, for its docstring and flags);
    answer the help flags, and turn flag errors and stray arguments into one-line errors."""
    see = f"(see python {Path(program.__file__).name} --help)"
    try:
        rest = flags.FLAGS(argv)
    except _HelpRequested as request:
        print_help(program, request.full)
        sys.exit(0)
    except (flags.Error, ValueError) as e:  # absl raises a bare ValueError for `--noflag=value`
        fail(f"{str(e).removeprefix('ERROR:: ')} {see}")
    if len(rest) > 1:
        fail(f"unexpected argument {rest[1]!r}: flags are written --name=value {see}")


def print_help(program: ModuleType, full: bool) -> None:
    """The program's docstring, then its own flags (key flags included) or, if `full`, every flag."""
    if full:
        listing = flags.FLAGS.get_help()
    else:
        # absl files a script's flags under sys.argv[0] (the path as typed), not "__main__".
        module = sys.argv[0] if program.__name__ == "__main__" else program.__name__
        listing = flags.FLAGS.module_help(module) + "\n\nTry --helpfull for every flag, the libraries' included."
    try:
        sys.stdout.write(f"{(program.__doc__ or '').strip()}\n\nflags:\n{listing}\n")
        sys.stdout.flush()
    except BrokenPipeError:  # `python train.py --helpfull | head`: quiet, as absl's usage() is
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
