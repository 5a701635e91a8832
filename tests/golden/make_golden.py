"""Write the golden fixtures: outputs and gradients of `native-sparse-attention-pytorch` 0.2.3.

Needs torch and the PyTorch package (not dependencies of nsa-jax, nor of CI). On these
machines torch exists for Python 3.11 only:

    python3.11 -m venv /tmp/venv311 && /tmp/venv311/bin/pip install torch==2.13.0 einops einx jaxtyping \
        native-sparse-attention-pytorch==0.2.3   # or the wheels in ../shared/wheels
    /tmp/venv311/bin/python tests/golden/make_golden.py

Each case builds a module, perturbs every parameter away from its init (zero-initialised ones
included), runs it on random input and saves weights, input, output and gradients to
tests/golden/<case>.npz. `tests/test_golden_parity.py` loads the weights through
`nsa_jax.convert` and compares (float32, max abs diff <= 1e-5).
"""

from __future__ import annotations

import itertools
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch

import native_sparse_attention_pytorch
from native_sparse_attention_pytorch import SparseAttention
from native_sparse_attention_pytorch.compress_networks import (
    AttentionPool,
    ConvLinearCompress,
    GroupedMLP,
    SingleProjection,
)
from native_sparse_attention_pytorch.transformer import Transformer

OUT = Path(__file__).parent
DIM, DIM_HEAD, HEADS, BATCH = 16, 8, 4, 2

# The option grid of the package's own tests, shrunk to a pairwise-covering subset.
GRID = dict(
    causal=[False, True],
    seq_len=[1, 4, 31, 32, 120],
    kv_heads=[4, 2, 1],
    blocks=[(4, 4, 4), (4, 2, 4), (8, 4, 8), (4, 4, 8), (8, 8, 8)],  # (compress block, stride, selection block)
    num_selected_blocks=[0, 2],
    query_heads_share_selected_kv=[False, True],
    use_diff_topk=[False, True],
    sliding_window_size=[2, 5],
)


def pairwise_cases(grid: dict, seed: int = 0) -> list[dict]:
    """A small set of cases in which every pair of option values occurs at least once."""
    names = list(grid)
    uncovered = {
        (a, va, b, vb)
        for a, b in itertools.combinations(names, 2)
        for va in grid[a] for vb in grid[b]
    }
    candidates = [dict(zip(names, values)) for values in itertools.product(*grid.values())]
    random.Random(seed).shuffle(candidates)
    cases = []
    while uncovered:
        def gain(c):
            return sum((a, c[a], b, c[b]) in uncovered for a, b in itertools.combinations(names, 2))
        best = max(candidates, key=gain)
        cases.append(best)
        uncovered -= {(a, best[a], b, best[b]) for a, b in itertools.combinations(names, 2)}
    return cases


def perturb(module: torch.nn.Module, scale: float = 0.5) -> None:
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * scale * max(float(p.std()) if p.numel() > 1 else 0.0, 0.2))


def state_arrays(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {f"sd/{k}": v.detach().numpy().copy() for k, v in module.state_dict().items()}


def grad_arrays(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {f"grad/{k}": p.grad.detach().numpy().copy() for k, p in module.named_parameters() if p.grad is not None}


def save(name: str, meta: dict, arrays: dict[str, np.ndarray]) -> None:
    np.savez_compressed(OUT / f"{name}.npz", meta=np.array(json.dumps(meta)), **arrays)


def sparse_attention_case(name: str, seed: int, opts: dict, compress: tuple[str, dict] | None = None) -> None:
    torch.manual_seed(seed)
    cb, cs, sb = opts["blocks"]
    kwargs = dict(
        dim=DIM, dim_head=DIM_HEAD, heads=HEADS, kv_heads=opts["kv_heads"], causal=opts["causal"],
        sliding_window_size=opts["sliding_window_size"], compress_block_size=cb,
        compress_block_sliding_stride=cs, selection_block_size=sb,
        num_selected_blocks=opts["num_selected_blocks"], use_diff_topk=opts["use_diff_topk"],
        query_heads_share_selected_kv=opts["query_heads_share_selected_kv"],
    )
    torch_kwargs = dict(kwargs)
    if compress is not None:
        torch_kwargs["compress_mlp"] = COMPRESS[compress[0]](cb, opts["kv_heads"], **compress[1])
    attn = SparseAttention(**torch_kwargs)
    perturb(attn)
    x = torch.randn(BATCH, opts["seq_len"], DIM, requires_grad=True)
    out = attn(x)
    cotangent = torch.randn_like(out)
    (out * cotangent).sum().backward()
    meta = dict(kind="sparse_attention", kwargs=kwargs, options={k: opts[k] for k in opts},
                compress=compress and compress[0], seed=seed)
    save(name, meta, dict(x=x.detach().numpy(), out=out.detach().numpy(), cotangent=cotangent.numpy(),
                          grad_x=x.grad.numpy(), **state_arrays(attn), **grad_arrays(attn)))


COMPRESS = {
    "grouped_mlp": lambda cb, kh, expand_factor=1.0: GroupedMLP(DIM_HEAD, cb, kh, expand_factor),
    "conv_linear": lambda cb, kh: ConvLinearCompress(kh, DIM_HEAD, cb),
    "attention_pool": lambda cb, kh: AttentionPool(DIM_HEAD, cb),
    "single_projection": lambda cb, kh: SingleProjection(DIM_HEAD, cb),
    "single_projection_grouped": lambda cb, kh: SingleProjection(DIM_HEAD, cb, kh),
}


def compress_network_case(name: str, seed: int, network: str, cb: int = 4, kh: int = 2) -> None:
    torch.manual_seed(seed)
    net = COMPRESS[network](cb, kh)
    perturb(net)
    kv = torch.randn(BATCH, kh, 3, cb, DIM_HEAD, requires_grad=True)
    out = net(kv)
    cotangent = torch.randn_like(out)
    (out * cotangent).sum().backward()
    meta = dict(kind="compress_network", network=network, compress_block_size=cb, kv_heads=kh, seed=seed)
    save(name, meta, dict(x=kv.detach().numpy(), out=out.detach().numpy(), cotangent=cotangent.numpy(),
                          grad_x=kv.grad.numpy(), **state_arrays(net), **grad_arrays(net)))


def dense_transformer_forward(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    """Transformer.forward for use_sparse_attn=False: the package's own forward passes `cache`
    to its dense Attention, which does not take it (a bug in 0.2.3), so run its layers here."""
    x = model.token_emb(ids)
    for attn, ff in model.layers:
        x = attn(x) + x
        x = ff(x) + x
    return model.to_logits(model.norm(x))


def transformer_case(name: str, seed: int, use_sparse_attn: bool, seq_len: int = 40) -> None:
    torch.manual_seed(seed)
    sparse_kwargs = dict(sliding_window_size=4, compress_block_size=4, compress_block_sliding_stride=2,
                         selection_block_size=4, num_selected_blocks=2, use_diff_topk=True)
    kwargs = dict(num_tokens=256, dim=DIM, depth=2, dim_head=DIM_HEAD, heads=HEADS, kv_heads=2,
                  use_sparse_attn=use_sparse_attn, causal=True, sparse_attn_kwargs=sparse_kwargs)
    torch_kwargs = dict(kwargs, sparse_attn_kwargs=dict(
        sparse_kwargs, compress_mlp=GroupedMLP(DIM_HEAD, 4, 2)))
    model = Transformer(**torch_kwargs)
    perturb(model)
    ids = torch.randint(0, 256, (BATCH, seq_len + 1))
    forward = model if use_sparse_attn else lambda t: dense_transformer_forward(model, t)
    logits = forward(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(forward(ids[:, :-1]).transpose(1, 2), ids[:, 1:])
    if use_sparse_attn:
        assert torch.allclose(loss, model(ids, return_loss=True))
    loss.backward()
    meta = dict(kind="transformer", kwargs=kwargs, seed=seed)
    save(name, meta, dict(ids=ids.numpy(), logits=logits.detach().numpy(), loss=loss.detach().numpy(),
                          **state_arrays(model), **grad_arrays(model)))


def main() -> None:
    assert native_sparse_attention_pytorch.__file__
    torch.set_default_dtype(torch.float32)
    for old in OUT.glob("*.npz"):
        old.unlink()
    cases = pairwise_cases(GRID)
    for i, opts in enumerate(cases):
        sparse_attention_case(f"sparse_attention_{i:02d}", 1000 + i, opts)
    base = dict(causal=True, seq_len=33, kv_heads=2, blocks=(4, 2, 4), num_selected_blocks=2,
                query_heads_share_selected_kv=True, use_diff_topk=True, sliding_window_size=4)
    for j, network in enumerate(COMPRESS):
        compress_network_case(f"compress_{network}", 2000 + j, network)
        sparse_attention_case(f"sparse_attention_with_{network}", 3000 + j, base, (network, {}))
    transformer_case("transformer_sparse", 4000, use_sparse_attn=True)
    transformer_case("transformer_dense", 4001, use_sparse_attn=False)
    total = sum(p.stat().st_size for p in OUT.glob("*.npz"))
    print(f"{len(cases)} grid cases, {len(list(OUT.glob('*.npz')))} files, {total / 1e6:.2f} MB", file=sys.stderr)


if __name__ == "__main__":
    main()
