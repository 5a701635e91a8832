"""The train state's parameters stacked across layers: one array per kind, [depth, ...].

A step updates each parameter array with its own kernels (gradient-norm reductions, Adam), so
the seed model's 129 arrays cost ~300 kernel launches a step. Stacking the `layers.<i>.*`
arrays of one kind on a leading axis leaves 24 arrays (`bench.count_kernels`: the T = 512 step
939 -> 718 kernels for an H200, the optimizer's 308 -> 67). The model itself keeps its per-layer
modules: the loss slices the stacked arrays back (`unstack`), layers still run one after the other
(a `lax.scan` over the layers counted 2,024 kernels: it saves and reloads each layer's
activations through dynamic slices).

Keys are paths joined by dots, the layer index replaced by `*`: `layers.*.attn.to_qkv.kernel`,
`token_emb.embedding`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Stacked = dict[str, jax.Array]


class LayerStack:
    """Stacks and unstacks parameter states shaped like `params` (parameters, gradients, Adam's
    moments: any `nnx.State` of the model's parameter structure)."""

    def __init__(self, params: nnx.State, layers: str = "layers"):
        flat = list(nnx.to_flat_state(params))
        self._paths = [path for path, _ in flat]
        # Only the variables' types and metadata, not their arrays: holding the arrays would keep
        # a second copy of every layer's parameters alive beside the stacked state.
        self._variables = [variable.replace(jax.ShapeDtypeStruct(variable.shape, variable.dtype))
                           for _, variable in flat]
        self._groups: dict[str, list[int]] = {}  # key -> positions in the flat state, layer order
        for i, path in enumerate(self._paths):
            stacked = len(path) > 1 and path[0] == layers and isinstance(path[1], int)
            key = ".".join("*" if stacked and j == 1 else str(p) for j, p in enumerate(path))
            self._groups.setdefault(key, []).append(i)
        for key, members in self._groups.items():
            if "*" in key:
                shapes = {tuple(self._variables[i].shape) for i in members}
                if len(shapes) != 1:
                    raise ValueError(f"layers differ in the shape of {key} ({sorted(shapes)}): cannot stack them")

    @property
    def keys(self) -> list[str]:
        return list(self._groups)

    def stack(self, state: nnx.State) -> Stacked:
        """An `nnx.State` of the parameter structure -> {key: array}, layer kinds [depth, ...]."""
        leaves = [variable.get_value() for _, variable in nnx.to_flat_state(state)]
        if len(leaves) != len(self._paths):
            raise ValueError(f"expected a state of {len(self._paths)} parameters, got {len(leaves)}")
        return {key: jnp.stack([leaves[i] for i in members]) if "*" in key else leaves[members[0]]
                for key, members in self._groups.items()}

    def unstack(self, stacked: Stacked) -> nnx.State:
        """{key: array} -> the `nnx.State` of the model's parameters (what `nnx.merge` takes)."""
        leaves: list[Any] = [None] * len(self._paths)
        for key, members in self._groups.items():
            value = stacked[key]
            for layer, i in enumerate(members):
                leaves[i] = value[layer] if "*" in key else value
        return nnx.from_flat_state([(path, variable.replace(leaf)) for path, variable, leaf
                                    in zip(self._paths, self._variables, leaves)])

    def stack_tree(self, tree: Any) -> Any:
        """`stack` every `nnx.State` of the parameter structure inside a pytree (an optimizer
        state of per-array moments -> the same state of stacked moments)."""
        def convert(node):
            if isinstance(node, nnx.State) and len(list(nnx.to_flat_state(node))) == len(self._paths):
                return self.stack(node)
            return node

        return jax.tree.map(convert, tree, is_leaf=lambda node: isinstance(node, nnx.State))
