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

The keys' and values' `GroupedMLP` parameters are held as one array each, [depth, 2 x heads, ...]
(keys' heads first), e.g. `layers.*.attn.{k,v}_compress.kernel_in`: the train step hands them whole
to the keys' network (`joined=True`), so `GroupedMLP.pair` runs both networks as one without
copying their weights together (BENCHMARKS.md, session 26).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Stacked = dict[str, jax.Array]

# Pairs of parameters (path suffixes within a layer) held as one array, joined on their first
# axis (the head axis: axis 1 once stacked); the first of the pair names the joined key.
JOINED = tuple((f"attn.k_compress.{name}", f"attn.v_compress.{name}")
               for name in ("kernel_in", "bias_in", "kernel_out", "bias_out"))


def _concat_heads(a, b):  # a pair -> its joined array
    return jnp.concatenate([a, b], axis=1)


def _halves(x, half: int):  # a joined array -> its pair
    return x[:, :half], x[:, half:]


def _joined_key(first: str, second: str) -> str:
    """'layers.*.attn.k_compress.kernel_in', '...v_compress...' -> 'layers.*.attn.{k,v}_compress.kernel_in'."""
    i = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    j = next(j for j, (a, b) in enumerate(zip(first[::-1], second[::-1])) if a != b)
    return f"{first[:i]}{{{first[i:len(first) - j]},{second[i:len(second) - j]}}}{first[len(first) - j:]}"


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
        self._joined: dict[str, tuple[str, str]] = {}  # joined key -> (first key, second key)
        for first, second in JOINED:
            a, b = f"{layers}.*.{first}", f"{layers}.*.{second}"
            if a in self._groups and b in self._groups and self._shape(a) == self._shape(b) and self._shape(a):
                self._joined[_joined_key(a, b)] = (a, b)

    @property
    def _seconds(self) -> set[str]:  # the keys of each joined pair's second parameter
        return {b for _, b in self._joined.values()}

    def _shape(self, key: str) -> tuple[int, ...]:  # one layer's shape of a stacked key
        return tuple(self._variables[self._groups[key][0]].shape)

    @property
    def keys(self) -> list[str]:
        return list(self.join({key: key for key in self._groups}, lambda a, b: a))

    def join(self, stacked: dict[str, Any], combine=_concat_heads) -> dict[str, Any]:
        """{key: array} with each `JOINED` pair apart -> the pair as one array (`combine`), in the
        first one's place."""
        out: dict[str, Any] = {}
        seconds = self._seconds
        firsts = {a: (key, b) for key, (a, b) in self._joined.items()}
        for key, value in stacked.items():
            if key in firsts:
                joined, second = firsts[key]
                out[joined] = combine(value, stacked.get(second))
            elif key not in seconds:
                out[key] = value
        return out

    def split(self, stacked: dict[str, Any], part=_halves) -> dict[str, Any]:
        """The inverse of `join`: each joined array -> its pair (`part` of it and the number of
        the first one's rows on axis 1)."""
        out: dict[str, Any] = {}
        for key, value in stacked.items():
            if key in self._joined:
                a, b = self._joined[key]
                out[a], out[b] = part(value, self._shape(a)[0])
            else:
                out[key] = value
        return out

    def stack(self, state: nnx.State, joined: bool = False) -> Stacked:
        """An `nnx.State` of the parameter structure -> {key: array}, layer kinds [depth, ...].
        joined: a state from `unstack(..., joined=True)` (its gradient): each pair's first
        parameter holds both; the second (its whole stack's gradient, zero) is left out."""
        leaves = [variable.get_value() for _, variable in nnx.to_flat_state(state)]
        if len(leaves) != len(self._paths):
            raise ValueError(f"expected a state of {len(self._paths)} parameters, got {len(leaves)}")
        seconds = self._seconds if joined else set()  # (their whole stacks' zero gradients)
        apart = {key: jnp.stack([leaves[i] for i in members]) if "*" in key else leaves[members[0]]
                 for key, members in self._groups.items() if key not in seconds}
        return self.join(apart, lambda a, b: a) if joined else self.join(apart)

    def unstack(self, stacked: Stacked, joined: bool = False) -> nnx.State:
        """{key: array} -> the `nnx.State` of the model's parameters (what `nnx.merge` takes).

        joined: for the train step's loss. Each `JOINED` pair's first parameter holds the
        pair's joined slice [2 x heads, ...], and the second the whole joined stack [depth, 2 x
        heads, ...] (the state's own array, not a copy), which `GroupedMLP.pair` recognises: it
        runs both networks as one, and kernels may read a layer's weights in that stack in place
        (`kernels.compress_matmul`). Any other use of those modules needs joined=False."""
        apart = self.split(stacked, (lambda x, half: (x, x)) if joined else _halves)
        whole = self._seconds if joined else set()  # keys every layer gets unsliced
        leaves: list[Any] = [None] * len(self._paths)
        for key, members in self._groups.items():
            value = apart[key]
            for layer, i in enumerate(members):
                leaves[i] = value[layer] if "*" in key and key not in whole else value
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

    def split_tree(self, tree: Any) -> Any:
        """`split` every {key: array} of this structure inside a pytree (a train state in this
        layout -> the same state with each joined pair apart: the layout before the join)."""
        keys = set(self.keys)
        is_stacked = lambda node: isinstance(node, dict) and set(node) == keys  # noqa: E731
        return jax.tree.map(lambda node: self.split(node) if is_stacked(node) else node, tree, is_leaf=is_stacked)

    def join_tree(self, tree: Any) -> Any:
        """The inverse of `split_tree`."""
        keys = set(self._groups)
        is_apart = lambda node: isinstance(node, dict) and set(node) == keys  # noqa: E731
        return jax.tree.map(lambda node: self.join(node) if is_apart(node) else node, tree, is_leaf=is_apart)
