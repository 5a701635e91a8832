"""Sliding-window attention: a band-limited Pallas flash kernel, cuDNN's local window, or dense masked XLA.

The Pallas kernel (`kernels._flash`) visits only the key tiles within `window` of a query
tile, with the g query heads of a kv head in the tile rows. `impl="auto"` picks, for causal
bf16/f16 attention on a GPU, cuDNN through
`jax.nn.dot_product_attention(..., local_window_size=(window, 0), implementation="cudnn")`
when the window is long (>= CUDNN_MIN_WINDOW) and the Pallas kernel otherwise: cuDNN
measured faster for the paper's window of 512, the Pallas kernel for the seed's 64
(BENCHMARKS.md, "Kernel settings"); the threshold between the two measured windows is a
choice, not a measurement. The Pallas kernel also serves f32, non-causal attention, odd
lengths under "auto" and CPU (interpret).

Non-causal quirk of the package (keys zero-padded to a multiple of `window` and the padding
left visible unless `mask_padding`): reproduced by padding the keys before the kernel and
counting the padding as real keys.
"""

from __future__ import annotations

import jax

from kernels._common import cudnn_flash_usable, in_xla, interpret_mode, pad_axis, round_up
from kernels._flash import Visibility, banded_attention
from kernels.settings import Tiles
from nsa_jax import reference
from nsa_jax import segments as seg


CUDNN_MIN_WINDOW = 256


def _cudnn_usable(q: jax.Array, k: jax.Array, causal: bool) -> bool:
    """cuDNN's window path: causal, `cudnn_flash_usable`, and (for its backward with a window mask,
    as JAX 0.11.2 checks) even sequence lengths."""
    return causal and cudnn_flash_usable(q) and q.shape[1] % 2 == 0 and k.shape[1] % 2 == 0


def _cudnn_window(q, k, v, window: int, scale: float) -> jax.Array:
    """Causal local window through cuDNN. Odd lengths get one zero token appended (cuDNN's
    window backward rejects odd lengths); being last, it is invisible to every real query."""
    nq, nk = q.shape[1], k.shape[1]
    q, k, v = pad_axis(q, 1, nq + nq % 2), pad_axis(k, 1, nk + nk % 2), pad_axis(v.astype(q.dtype), 1, nk + nk % 2)
    out = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, local_window_size=(window, 0),
                                       implementation="cudnn")
    return out[:, :nq]


def sliding_window_attention(
    q: jax.Array,  # [b, nq, h, d], rotated
    k: jax.Array,  # [b, nk, kh, d], rotated
    v: jax.Array,  # [b, nk, kh, d]
    segments: seg.Segments | None = None,  # packed documents
    *,
    window: int,
    causal: bool,
    scale: float | None = None,
    mask_padding: bool = False,
    impl: str = "auto",  # "auto" | "pallas" | "cudnn" | "xla"
    tiles: Tiles = Tiles(),
) -> jax.Array:  # [b, nq, h, d]
    """`nsa_jax.reference.sliding_window_attention` for the parallel forward (no `q_positions`).

    With segments (the Pallas kernel) each query sees its document's tokens only, as bounds
    per query, and the zero padding of the non-causal quirk is counted per document.
    impl="xla": no kernel, the reference's dense masked attention ([b, h, n, n] logits), its
    backward recomputing them (`jax.checkpoint`): for short sequences."""
    d = q.shape[-1]
    scale = d**-0.5 if scale is None else scale
    if impl == "xla":
        return in_xla(lambda q, k, v, segments: reference.sliding_window_attention(
            q, k, v, window=window, causal=causal, scale=scale, mask_padding=mask_padding, segments=segments),
            q, k, v, segments)
    if segments is not None:
        phantom = seg.window_padding(segments, window) if not causal and not mask_padding and window > 0 else None
        vis = Visibility("window", causal=causal, num_keys=k.shape[1], window=window, packed=True,
                         phantom=phantom is not None)
        return banded_attention(q, k, v, vis, scale=scale, tiles=tiles, interpret=interpret_mode(),
                                bounds=(segments.start, segments.end), phantom=phantom)
    if impl == "cudnn" or (impl == "auto" and window >= CUDNN_MIN_WINDOW and _cudnn_usable(q, k, causal)):
        if not causal:
            raise ValueError("the cuDNN sliding window serves causal attention only")
        return _cudnn_window(q, k, v, window, scale)
    num_keys = k.shape[1]
    if not causal and not mask_padding and window > 0:
        num_keys = round_up(num_keys, window)  # the package's visible zero padding
        k, v = pad_axis(k, 1, num_keys), pad_axis(v, 1, num_keys)
    vis = Visibility("window", causal=causal, num_keys=num_keys, window=window)
    return banded_attention(q, k, v, vis, scale=scale, tiles=tiles, interpret=interpret_mode())
