"""nsa_jax.convert: clear errors on mismatched checkpoints; the compress network is recognised."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nsa_jax import GroupedMLP, convert

FIXTURE = Path(__file__).parent / "golden" / "sparse_attention_with_grouped_mlp.npz"


def fixture():
    data = np.load(FIXTURE)
    kwargs = json.loads(str(data["meta"]))["kwargs"]
    return kwargs, {k[3:]: data[k] for k in data.files if k.startswith("sd/")}


def test_compress_network_recognised_even_when_a_torch_module_is_passed():
    kwargs, sd = fixture()
    attn = convert.sparse_attention_from_torch(sd, **kwargs, compress_mlp=object())  # stands in for a torch module
    assert isinstance(attn.k_compress, GroupedMLP)
    np.testing.assert_array_equal(np.asarray(attn.k_compress.kernel_in[...]), sd["k_compress.net.0.weight"])


def test_missing_entry_names_the_key():
    kwargs, sd = fixture()
    del sd["to_qkv.weight"]
    with pytest.raises(KeyError, match="to_qkv.weight"):
        convert.sparse_attention_from_torch(sd, **kwargs)


def test_wrong_shape_names_key_and_shapes():
    kwargs, sd = fixture()
    with pytest.raises(ValueError, match=r"to_qkv.weight.*shape"):
        convert.sparse_attention_from_torch(sd, **dict(kwargs, heads=2, kv_heads=2))


def test_unused_entries_are_reported():
    kwargs, sd = fixture()
    sd["extra.weight"] = np.zeros(3)
    with pytest.raises(ValueError, match="extra.weight"):
        convert.sparse_attention_from_torch(sd, **kwargs)
