"""The passkey retrieval task: a needle (a key line) in a haystack of filler bytes.

Each example is one byte sequence of a fixed length:

    [filler][ The pass key is 48213. Remember it. 48213 is the pass key. ][filler][ What is the pass key? The pass key is ]48213

The key line starts at a chosen depth (0: the start of the filler, 1: just before the
question); the answer, the key's digits, ends the sequence. A model is trained with only the
answer bytes as targets (`Batch.loss_mask`) and scored by exact match: every answer byte is the
argmax of the logits before it, with the true answer bytes as inputs (teacher forcing). That is
the same as greedy decoding the answer: greedy decoding emits the true bytes exactly when each
of those argmaxes is right, and differs from the first one that is not.

The filler is a stretch of a corpus (its bytes from a random offset, wrapping around) or, by
default, the sentences repeated by the usual passkey tests, which make the key line the only
thing worth remembering.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

DEFAULT_FILLER = b"The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
KEY_LINE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = " What is the pass key? The pass key is "


class Batch(NamedTuple):
    tokens: np.ndarray  # [b, length] int32 bytes, the answer last
    loss_mask: np.ndarray  # [b, length] bool: the answer bytes (the targets to train on)
    answer_start: np.ndarray  # [b] int32: index of the answer's first byte
    depth: np.ndarray  # [b] float: where the key line starts, as a fraction of the filler
    key: np.ndarray  # [b] the keys, as strings of digits


class PasskeyTask:
    """Examples of `length` bytes with a `digits`-digit key; `filler`: the haystack's bytes."""

    def __init__(self, filler: bytes | None = None, digits: int = 5):
        if digits < 1:
            raise ValueError(f"digits must be >= 1, got {digits}")
        self.filler = np.frombuffer(filler or DEFAULT_FILLER, dtype=np.uint8)
        if self.filler.size == 0:
            raise ValueError("the filler is empty: pass a non-empty corpus (or none, for the default sentences)")
        self.digits = digits
        self.overhead = len(KEY_LINE.format(key="0" * digits)) + len(QUESTION) + digits

    def min_length(self) -> int:
        """The shortest example: the key line, question and answer with no filler."""
        return self.overhead

    def example(self, rng: np.random.Generator, length: int, depth: float) -> tuple[np.ndarray, int, str]:
        """One example: (bytes [length] int32, index of the answer's first byte, the key)."""
        if length < self.overhead:
            raise ValueError(f"length {length} is too short for the task: at least {self.overhead} bytes")
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {depth}")
        key = "".join(str(d) for d in rng.integers(0, 10, self.digits))
        fill = length - self.overhead
        start = int(rng.integers(0, self.filler.size))
        haystack = np.take(self.filler, np.arange(start, start + fill), mode="wrap")
        before = int(round(depth * fill))
        parts = [haystack[:before], _bytes(KEY_LINE.format(key=key)), haystack[before:], _bytes(QUESTION), _bytes(key)]
        tokens = np.concatenate(parts).astype(np.int32)
        assert tokens.size == length
        return tokens, length - self.digits, key

    def key_spans(self, length: int, depth: float) -> list[tuple[int, int]]:
        """The byte spans [start, end) of the key's two occurrences in an example of `length`
        bytes with the key line at `depth` (where retrieval has to look)."""
        line_start = int(round(depth * (length - self.overhead)))
        template = KEY_LINE.format(key="\0" * self.digits)
        first = template.index("\0")
        second = template.index("\0", first + self.digits)
        return [(line_start + first, line_start + first + self.digits),
                (line_start + second, line_start + second + self.digits)]

    def batch(self, rng: np.random.Generator, size: int, length: int, depths=None) -> Batch:
        """`size` examples; depths: one per example (default: uniform in [0, 1])."""
        depths = rng.uniform(0.0, 1.0, size) if depths is None else np.broadcast_to(np.asarray(depths, float), (size,))
        rows = [self.example(rng, length, float(d)) for d in depths]
        tokens = np.stack([r[0] for r in rows])
        starts = np.array([r[1] for r in rows], np.int32)
        mask = np.arange(length)[None, :] >= starts[:, None]
        return Batch(tokens, mask, starts, np.asarray(depths, float), np.array([r[2] for r in rows]))


def _bytes(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("ascii"), dtype=np.uint8)


def predicted_answer(logits, answer_start, digits: int):
    """int [b, digits]: the argmax byte before each answer byte (teacher forced), for logits
    [b, n, vocab] of the model run on an example's bytes; answer_start [b]."""
    positions = jnp.asarray(answer_start)[:, None] + jnp.arange(digits)[None, :]  # [b, digits] target indices
    return jnp.argmax(jnp.take_along_axis(logits, (positions - 1)[:, :, None], axis=1), axis=-1)


def exact_match(logits, tokens, answer_start, digits: int):
    """bool [b]: every answer byte is the argmax of the logits before it.

    logits [b, n, vocab] of the model run on tokens [b, n + 1][:, :-1] (or on tokens [b, n]
    themselves: only positions before the last are read); answer_start [b]."""
    b = tokens.shape[0]
    positions = jnp.asarray(answer_start)[:, None] + jnp.arange(digits)[None, :]  # [b, digits] target indices
    predicted = predicted_answer(logits, answer_start, digits)
    wanted = jnp.take_along_axis(jnp.asarray(tokens), positions, axis=1)
    assert predicted.shape == (b, digits)
    return jnp.all(predicted == wanted, axis=1)
