"""Parity with native-sparse-attention-pytorch 0.2.3 through the golden fixtures in tests/golden.

The fixtures hold the package's weights (perturbed away from init), inputs, outputs and
gradients; `tests/golden/make_golden.py` writes them where torch is installed. Here the weights
go through `nsa_jax.convert` and our outputs and gradients must match in float32, on the
reference backend and (slow tier; interpret mode on the CPU) on the Pallas kernels.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nsa_jax import convert

GOLDEN = sorted((Path(__file__).parent / "golden").glob("*.npz"))
# What make_golden.py writes: 30 pairwise-covering option-grid cases, each compress network alone
# and inside SparseAttention, and a sparse and a dense Transformer.
COMPRESS = ("attention_pool", "conv_linear", "grouped_mlp", "single_projection", "single_projection_grouped")
EXPECTED = ({f"sparse_attention_{i:02d}" for i in range(30)} | {f"compress_{c}" for c in COMPRESS}
            | {f"sparse_attention_with_{c}" for c in COMPRESS} | {"transformer_sparse", "transformer_dense"})
# The quick tier: every compress network, both Transformers and the first grid cases.
QUICK = ({f"compress_{c}" for c in COMPRESS} | {f"sparse_attention_with_{c}" for c in COMPRESS}
         | {"transformer_sparse", "transformer_dense"} | {f"sparse_attention_{i:02d}" for i in range(6)})
OUT_TOL = 1e-5  # max abs diff of outputs (the bar)
GRAD_TOL = 1e-5  # relative to the largest gradient entry (at least 1)


def load(path: Path):
    data = np.load(path)
    meta = json.loads(str(data["meta"]))
    sd = {k[3:]: data[k] for k in data.files if k.startswith("sd/")}
    grads = {k[5:]: data[k] for k in data.files if k.startswith("grad/")}
    return meta, data, sd, grads


def assert_close(ours, theirs, tol, what):
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape, f"{what}: shape {ours.shape} != {theirs.shape}"
    err = float(np.max(np.abs(ours - theirs))) if ours.size else 0.0
    assert err <= tol, f"{what}: max abs diff {err:.3g} > {tol:.3g}"
    return err


def build(meta, sd, use_pallas_nsa: bool = False):
    if meta["kind"] == "sparse_attention":
        return convert.sparse_attention_from_torch(sd, use_pallas_nsa=use_pallas_nsa, **meta["kwargs"])
    if meta["kind"] == "transformer":
        return convert.transformer_from_torch(sd, use_pallas_nsa=use_pallas_nsa, **meta["kwargs"])
    net = convert.compress_network_from_state_dict(
        sd, "", dim_head=meta.get("dim_head", 8),
        compress_block_size=meta["compress_block_size"], rngs=nnx.Rngs(0))
    return convert.load_torch_state_dict(net, sd)


def test_fixtures_exist():
    assert {p.stem for p in GOLDEN} == EXPECTED
    kinds = {json.loads(str(np.load(p)["meta"]))["kind"] for p in GOLDEN}
    assert kinds == {"sparse_attention", "compress_network", "transformer"}, kinds


def golden_params() -> list:
    """(fixture, backend): every fixture on the reference; those with sparse attention also on
    the Pallas kernels (slow tier)."""
    params = []
    for path in GOLDEN:
        params.append(pytest.param(path, "reference", id=f"{path.stem}-reference",
                                   marks=() if path.stem in QUICK else pytest.mark.slow))
        if path.stem.startswith("sparse_attention") or path.stem == "transformer_sparse":
            params.append(pytest.param(path, "pallas", id=f"{path.stem}-pallas", marks=pytest.mark.slow))
    return params


@pytest.mark.parametrize("path,backend", golden_params())
def test_golden_parity(path, backend):
    meta, data, sd, torch_grads = load(path)
    module = build(meta, sd, use_pallas_nsa=backend == "pallas")
    if backend == "pallas":  # the module really runs the kernels
        attentions = [module] if meta["kind"] == "sparse_attention" else [b.attn for b in module.layers]
        assert all(a.backend.name == "pallas" for a in attentions)
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    if meta["kind"] == "transformer":
        ids = jnp.asarray(data["ids"])
        logits = jax.jit(lambda p: nnx.merge(graphdef, p, rest)(ids[:, :-1]))(params)
        assert_close(logits, data["logits"], OUT_TOL, "logits")

        def loss_fn(p):
            return nnx.merge(graphdef, p, rest)(ids, return_loss=True)

        loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
        assert_close(loss, data["loss"], OUT_TOL, "loss")
    else:
        x, cot = jnp.asarray(data["x"]), jnp.asarray(data["cotangent"])

        def fn(p, x):
            out = nnx.merge(graphdef, p, rest)(x)
            return jnp.sum(out * cot), out

        (_, out), (grads, grad_x) = jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))(params, x)
        assert_close(out, data["out"], OUT_TOL, "output")
        ref = data["grad_x"]
        assert_close(grad_x, ref, GRAD_TOL * max(1.0, float(np.abs(ref).max())), "grad input")

    grad_module = nnx.merge(graphdef, grads, rest)
    compared = set()
    for variable, key, transform in convert.parameter_map(grad_module):
        if key in torch_grads:  # PyTorch leaves .grad None for parameters the output does not use
            ref = transform(torch_grads[key])
        else:
            ref = np.zeros(variable[...].shape)
        assert_close(variable[...], ref, GRAD_TOL * max(1.0, float(np.abs(ref).max())), f"grad {key}")
        compared.add(key)
    assert compared >= set(torch_grads), "every PyTorch parameter gradient was compared"
