"""Byte corpora and a seeded, checkpointable sampler of random crops.

- enwik8 as distributed (`enwik8.zip`), gzipped (`enwik8.gz`, the seed's file) or raw
  (`enwik8`): the seed's split, first 95e6 bytes, 90e6 for training and 5e6 for validation.
- any other file (optionally `.gz`): its last `valid_fraction` is validation.
- `stdlib`: the running Python's standard-library sources, concatenated in sorted path
  order; a corpus every machine has without a download (the quickstart uses it).
"""

from __future__ import annotations

import codecs
import gzip
import os
import re
import sysconfig
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

ENWIK8_TOTAL, ENWIK8_TRAIN = int(95e6), int(90e6)
ENWIK8_SEPARATOR = b"<page>"  # a Wikipedia article starts at each <page> element
TEXT_SEPARATOR = b"\n\n"  # elsewhere: a blank line
BUILTIN_STDLIB = "stdlib"
STDLIB_MAX_BYTES = 16 * 2**20


class DataError(Exception):
    """A problem with the data the user pointed at (reported in one line, no traceback)."""


def _read(path: Path, limit: int | None = None) -> bytes:
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.namelist() if not m.endswith("/")]
            if not members:
                raise DataError(f"{path} is an empty zip archive")
            name = "enwik8" if "enwik8" in members else members[0]
            with archive.open(name) as f:
                return f.read(limit if limit is not None else -1)
    if path.suffix == ".gz":
        with gzip.open(path) as f:
            return f.read(limit if limit is not None else -1)
    with open(path, "rb") as f:
        return f.read(limit if limit is not None else -1)


def stdlib_corpus(max_bytes: int = STDLIB_MAX_BYTES) -> bytes:
    """The standard library's .py sources (tests and site-packages excluded), sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py")
        if not any(part in ("site-packages", "dist-packages", "test", "tests", "idlelib") for part in p.relative_to(root).parts)
    )
    chunks, total = [], 0
    for p in files:
        chunk = p.read_bytes()
        chunks.append(chunk)
        total += len(chunk)
        if total >= max_bytes:
            break
    return b"".join(chunks)[:max_bytes]


def is_enwik8(path: str | os.PathLike) -> bool:
    return Path(path).name in ("enwik8", "enwik8.gz", "enwik8.zip")


def load_corpus(data_path: str, valid_fraction: float = 0.05,
                enwik8_split: tuple[int, int] = (ENWIK8_TOTAL, ENWIK8_TRAIN)) -> tuple[np.ndarray, np.ndarray]:
    """(train bytes, validation bytes) as uint8 arrays. enwik8 uses the seed's split
    (first `enwik8_split[0]` bytes, of which the first `enwik8_split[1]` train)."""
    if data_path == BUILTIN_STDLIB:
        data = stdlib_corpus()
    else:
        path = Path(data_path).expanduser()
        if not path.is_file():
            raise DataError(f"data file not found: {data_path} (pass --data_path, or --data_path=stdlib for the built-in corpus)")
        try:
            if is_enwik8(path):
                total, train = enwik8_split
                array = np.frombuffer(_read(path, total), dtype=np.uint8)
                return array[:train], array[train:]
            data = _read(path)
        except (OSError, zipfile.BadZipFile, EOFError) as e:
            raise DataError(f"cannot read data file {data_path}: {e}") from None
    array = np.frombuffer(data, dtype=np.uint8)
    if not 0.0 < valid_fraction < 1.0:
        raise DataError(f"--valid_fraction must be in (0, 1), got {valid_fraction}")
    split = int(round(len(array) * (1.0 - valid_fraction)))
    return array[:split], array[split:]


def decode_tokens(tokens) -> str:
    """Bytes to text as the seed prints them: each byte is a character, control bytes become spaces."""
    return "".join(chr(max(32, int(t))) for t in tokens)


class CropSampler:
    """Random crops of `seq_len + 1` bytes, drawn by a seeded numpy RNG whose state is checkpointable."""

    def __init__(self, data: np.ndarray, seq_len: int, seed: int, *, name: str = "the corpus split",
                 fixes: str = "use a larger file or a smaller --seq_len"):
        if len(data) < seq_len + 1:
            raise DataError(f"{name} has {len(data):,} bytes, fewer than seq_len + 1 = {seq_len + 1:,}; {fixes}")
        self.data = data
        self.seq_len = seq_len
        self.rng = np.random.Generator(np.random.PCG64(seed))

    def sample(self, *shape: int) -> np.ndarray:
        """int32 crops of shape [*shape, seq_len + 1]; starts uniform in [0, len - seq_len)."""
        starts = self.rng.integers(0, len(self.data) - self.seq_len, size=shape)
        offsets = starts[..., None] + np.arange(self.seq_len + 1)
        return self.data[offsets].astype(np.int32)

    def state(self) -> dict[str, Any]:
        return self.rng.bit_generator.state

    def set_state(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state


def parse_separator(text: str | None, data_path: str) -> bytes:
    """--document_separator -> bytes. Python escapes are understood ("\\n\\n" is a blank line);
    None gives the corpus's default: `<page>` for enwik8, a blank line otherwise."""
    if text is None:
        return ENWIK8_SEPARATOR if is_enwik8(data_path) else TEXT_SEPARATOR
    try:
        separator = codecs.decode(text, "unicode_escape").encode("latin-1")
    except (UnicodeDecodeError, UnicodeEncodeError) as e:
        raise DataError(f"--document_separator {text!r} is not a byte string: {e}") from None
    if not separator:
        raise DataError("--document_separator is empty; give the bytes that start a document (e.g. '<page>' or '\\n\\n')")
    return separator


def document_starts(data: np.ndarray, separator: bytes) -> np.ndarray:
    """int64 [documents]: where each document begins: at 0 and at every occurrence of the
    separator (which begins the next document: an enwik8 article starts with its <page>)."""
    found = [m.start() for m in re.finditer(re.escape(separator), data.tobytes())]
    return np.unique(np.asarray([0] + found, np.int64))


class PackedCropSampler(CropSampler):
    """`CropSampler` over documents: each crop also gets segment ids, the index of the document
    each byte belongs to (documents begin at `starts`), so that a model trained on it
    attends within documents and skips the targets that cross into the next one."""

    def __init__(self, data: np.ndarray, seq_len: int, seed: int, starts: np.ndarray, **kwargs):
        super().__init__(data, seq_len, seed, **kwargs)
        self.starts = starts

    def sample(self, *shape: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, segment ids), both int32 [*shape, seq_len + 1]."""
        starts = self.rng.integers(0, len(self.data) - self.seq_len, size=shape)
        offsets = starts[..., None] + np.arange(self.seq_len + 1)
        documents = np.searchsorted(self.starts, offsets, side="right")
        return self.data[offsets].astype(np.int32), documents.astype(np.int32)
