"""Frozen configurations: the model (saved in every checkpoint) and the training run.

`train.py` maps its flags onto these; a checkpoint stores `ModelConfig.to_dict()` so that
`sample.py` rebuilds the model from the checkpoint directory alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
from flax import nnx

from nsa_jax.attention import parse_branches
from nsa_jax.transformer import Transformer


@dataclass(frozen=True)
class ModelConfig:
    """The byte-level Transformer of the seed's train.py (defaults are the seed's)."""

    num_tokens: int = 256
    dim: int = 512
    depth: int = 6
    heads: int = 8
    kv_heads: int = 4
    dim_head: int = 64
    ff_expansion_factor: float = 4.0
    use_sparse_attn: bool = True
    causal: bool = True
    sliding_window_size: int = 64
    compress_block_size: int = 16
    compress_block_sliding_stride: int = 16
    selection_block_size: int = 16
    num_selected_blocks: int = 4
    use_diff_topk: bool = True
    query_heads_share_selected_kv: bool = True
    interpolated_importance_score: bool = False
    compress_mlp: str = "grouped_mlp"
    compress_mlp_expand_factor: float = 1.0
    nsa_branches: str = "compressed,selected,sliding"  # comma-separated; fewer for ablation studies

    def sparse_attn_kwargs(self) -> dict[str, Any]:
        return dict(
            sliding_window_size=self.sliding_window_size,
            compress_block_size=self.compress_block_size,
            compress_block_sliding_stride=self.compress_block_sliding_stride,
            selection_block_size=self.selection_block_size,
            num_selected_blocks=self.num_selected_blocks,
            use_diff_topk=self.use_diff_topk,
            query_heads_share_selected_kv=self.query_heads_share_selected_kv,
            interpolated_importance_score=self.interpolated_importance_score,
            compress_mlp=self.compress_mlp,
            compress_mlp_expand_factor=self.compress_mlp_expand_factor,
            branches=tuple(name.strip() for name in self.nsa_branches.split(",") if name.strip()),
        )

    def build(self, rngs: nnx.Rngs, *, use_pallas_nsa: bool | None = None, dtype: str = "float32",
              kernel_settings=None, remat: str = "none") -> Transformer:
        """The Transformer. Backend, kernel settings, activation dtype and rematerialisation are
        run-time choices, not part of the model."""
        return Transformer(
            num_tokens=self.num_tokens,
            dim=self.dim,
            depth=self.depth,
            dim_head=self.dim_head,
            heads=self.heads,
            kv_heads=self.kv_heads,
            ff_expansion_factor=self.ff_expansion_factor,
            use_sparse_attn=self.use_sparse_attn,
            causal=self.causal,
            sparse_attn_kwargs=self.sparse_attn_kwargs(),
            use_pallas_nsa=use_pallas_nsa,
            kernel_settings=kernel_settings,
            remat=remat,
            dtype=None if dtype == "float32" else jnp.dtype(dtype),
            rngs=rngs,
        )

    def validate(self) -> str | None:
        """The first problem with these settings, as one line naming the setting, or None.

        Builds the model abstractly (`nnx.eval_shape`: no parameters are computed), so the
        modules' own argument checks are the single source of truth.
        """
        for name in ("num_tokens", "dim", "depth", "heads", "kv_heads", "dim_head"):
            if getattr(self, name) < 1:
                return f"{name} must be >= 1, got {getattr(self, name)}"
        try:
            parse_branches(self.nsa_branches)
        except ValueError as e:
            return f"nsa_branches={self.nsa_branches!r}: {e}"
        try:
            nnx.eval_shape(lambda: self.build(nnx.Rngs(0)))
        except (ValueError, TypeError) as e:
            return str(e)
        return None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def differences(self, saved: "ModelConfig") -> list[str]:
        """'name: saved -> ours' for every setting that differs from a saved configuration."""
        a, b = self.to_dict(), saved.to_dict()
        return [f"{k}: {b[k]!r} in the checkpoint, {a[k]!r} now" for k in a if a[k] != b[k]]


@dataclass(frozen=True)
class TrainConfig:
    """The training loop (defaults are the seed's)."""

    num_batches: int = 100_000
    batch_size: int = 4
    grad_accum_every: int = 4
    learning_rate: float = 1e-4
    max_grad_norm: float = 0.5
    seq_len: int = 512
    validate_every: int = 100
    generate_every: int = 500
    prime_length: int = 64
    generate_length: int = 512
    use_efficient_inference: bool = True
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 10
    seed: int = 0
    dtype: str = "float32"
    remat: str = "none"

    def validate(self) -> str | None:
        """The first problem with these settings, as one line naming the setting, or None."""
        positive = ("batch_size", "grad_accum_every", "seq_len", "prime_length", "keep_checkpoints", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                return f"--{name} must be >= 1, got {getattr(self, name)}"
        for name in ("num_batches", "validate_every", "generate_every", "generate_length", "checkpoint_every"):
            if getattr(self, name) < 0:
                return f"--{name} must be >= 0, got {getattr(self, name)}"
        if not self.learning_rate > 0:
            return f"--learning_rate must be > 0, got {self.learning_rate}"
        return None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum_every * self.seq_len
