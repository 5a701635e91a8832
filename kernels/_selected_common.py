"""What both selected-attention kernel families share: the static layout and the block sort.

`kernels.selected_query` (one program per query) and `kernels.selected_tiled` (one program
per tile of queries) import this module; neither imports the other.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SelectedConfig:
    """The static shape of one selected-attention call, as the kernels see it."""

    sb: int  # selection block size
    sbp: int  # keys loaded per block: a power of two >= sb (>= MIN_DOT on the matrix-unit path)
    nb: int  # key blocks
    nq: int  # queries
    num_sel: int  # k'
    kp: int  # k' padded to a power of two (>= 1)
    rows: int  # rows of a selection group (g heads when shared, else 1), power of two
    groups_per_kv: int  # selection groups per kv head (1 when shared, else g)
    causal: bool
    scale: float
    num_warps: int
    num_stages: int
    interpret: bool

    @property
    def zero_rows_possible(self) -> bool:
        """Non-causal with k' > 0: a group with no valid block gets the uniform fallback."""
        return not self.causal and self.num_sel > 0

    @property
    def own_block(self) -> bool:
        """The own block is attended (causal, or nothing can be selected)."""
        return self.causal or self.num_sel == 0


def sort_by_block(key: jax.Array, nb: int) -> tuple[jax.Array, jax.Array]:
    """key [rows, e] block ids (nb: unused entry) -> (order [rows, e]: entry ids sorted by block,
    stable; offsets [rows, nb + 1] int32: block j's entries are order[offsets[j]:offsets[j + 1]]).

    The transpose of a selection (which queries or tiles chose each block), for the dk/dv kernels.
    """
    order = jnp.argsort(key, axis=-1, stable=True)
    sorted_key = jnp.take_along_axis(key, order, axis=-1)
    offsets = jax.vmap(lambda row: jnp.searchsorted(row, jnp.arange(nb + 1), side="left"))(sorted_key)
    return order, offsets.astype(jnp.int32)
