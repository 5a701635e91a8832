"""The pieces of the training loop: optimizer, the jitted train and eval steps, bits per byte.

The model is split once (`nnx.split`) into a static graph and its parameters; the steps are
pure functions of arrays, compiled once: forward, backward, gradient accumulation over the
micro-batches (a `lax.scan`), global-norm clipping and Adam, all in one program, with the
parameter and optimizer buffers donated.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from nsa_jax import context, sharding
from nsa_jax.stacking import LayerStack, Stacked
from nsa_jax.transformer import counted_targets

LN2 = math.log(2.0)

# XLA options of the compiled train and eval steps (set here, they override XLA's). Empty: XLA's
# defaults, command buffers (CUDA graphs) on. They were off while the step ran ~1,400 small kernels;
# at ~760 they are faster for NSA and dense alike (H200, 2026-12-01: BENCHMARKS.md, session 25).
STEP_COMPILER_OPTIONS: dict[str, str] = {}


# tokens [.., n + 1]; or tokens and their segment ids (packed documents); or a dict of "tokens"
# with "segment_ids" and/or "loss_mask" (the tokens that count as targets: `Transformer.__call__`).
Batch = jax.Array | tuple[jax.Array, jax.Array] | dict[str, jax.Array]


class TrainState(NamedTuple):
    params: Stacked  # the model's parameters, layers stacked per kind (`nsa_jax.stacking`)
    opt_state: optax.OptState


# How a TrainState holds the parameters; checkpoints record it (train.py) so that one saved with
# another layout can be converted when restored (`Trainer.layout_converters`). None: checkpoints
# from before it was recorded, with the per-layer parameter state; "layers stacked": before the
# parameters of the keys' and values' compress networks were joined (`nsa_jax.stacking.JOINED`).
STATE_LAYOUT = "layers stacked, compress networks joined"


def make_optimizer(learning_rate: float | optax.Schedule, max_grad_norm: float = 0.5, *,
                   flat: bool = False) -> optax.GradientTransformation:
    """The seed's optimizer: clip the global gradient norm, then Adam.

    flat=True runs both on one vector of all parameters (`optax.flatten`): a few large kernels
    instead of several per parameter array, the same update up to float rounding. Its Adam
    moments are then one vector each, a checkpoint layout of its own: for measurements
    (`bench.train_step`, `bench.profile_step` --flat_optimizer) until it is the default.
    """
    inner = optax.chain(optax.clip_by_global_norm(max_grad_norm), optax.adam(learning_rate))
    return optax.flatten(inner) if flat else inner


def bits_per_byte(loss: jax.Array | float) -> jax.Array | float:
    """Cross entropy in nats per byte -> bits per byte."""
    return loss / LN2


def batch_parts(batch: Batch) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """A micro-batch (`Batch`) -> (tokens [b, n + 1], segment ids or None, loss mask or None)."""
    if isinstance(batch, dict):
        return batch["tokens"], batch.get("segment_ids"), batch.get("loss_mask")
    if isinstance(batch, tuple):
        tokens, segment_ids = batch
        return tokens, segment_ids, None
    return batch, None, None


def target_count(batch: Batch) -> jax.Array:
    """How many targets a micro-batch's loss averages over (float32): `counted_targets`."""
    tokens, segment_ids, loss_mask = batch_parts(batch)
    counted = counted_targets(segment_ids, loss_mask)
    if counted is None:
        return jnp.float32(tokens.shape[0] * (tokens.shape[1] - 1))
    return jnp.sum(counted, dtype=jnp.float32)


def _reduce_to(grad: jax.Array, spec: P) -> jax.Array:
    """All-reduce grad over the `data` devices; reduce-scatter it instead where spec splits an
    axis over them (each device keeps the sum of its part)."""
    if sharding.DATA not in tuple(spec):
        return jax.lax.psum(grad, sharding.DATA)
    return jax.lax.psum_scatter(grad, sharding.DATA, scatter_dimension=tuple(spec).index(sharding.DATA), tiled=True)


class Trainer:
    """Holds the model's static graph, the device mesh and the compiled steps.

    The state lives on `mesh` (replicated, split FSDP-style, or the optimizer state alone split:
    `shard_optimizer`); batches are split over its `data` axis, and each sequence along its
    length over its `context` axis when that has more than one device (`nsa_jax.context`). On
    one device this is plain single-device training.
    """

    def __init__(self, model: nnx.Module, optimizer: optax.GradientTransformation,
                 mesh: Mesh | None = None, fsdp: bool = False, shard_optimizer: bool = False):
        self.graphdef, params, self.rest = nnx.split(model, nnx.Param, ...)
        self.layers = LayerStack(params)
        self.optimizer = optimizer
        self.mesh = sharding.make_mesh() if mesh is None else mesh
        stacked = self.layers.stack(params)
        state = TrainState(stacked, optimizer.init(stacked))
        if fsdp and shard_optimizer:
            raise ValueError("fsdp already splits the optimizer state: pass fsdp or shard_optimizer, not both")
        self.context = sharding.context_size(self.mesh)
        if self.context > 1 and (fsdp or shard_optimizer):
            raise ValueError("context parallelism keeps the state replicated: drop fsdp and shard_optimizer")
        self.fsdp, self.shard_optimizer = fsdp, shard_optimizer
        self.state_sharding = self._state_sharding(state)
        self._init_state = jax.device_put(state, self.state_sharding)
        scalar = sharding.replicated(self.mesh)
        self._jit_train_step = jax.jit(self._train_step, donate_argnums=(0,), out_shardings=(self.state_sharding, scalar),
                                       compiler_options=STEP_COMPILER_OPTIONS)
        self._jit_eval_step = jax.jit(self._eval_step, out_shardings=scalar, compiler_options=STEP_COMPILER_OPTIONS)

    def _state_sharding(self, state: TrainState) -> TrainState:
        """Replicated; split FSDP-style (fsdp); or parameters replicated and the optimizer state
        split (shard_optimizer: ZeRO-1, each device updating its part of every array)."""
        if self.shard_optimizer:
            return TrainState(sharding.state_sharding(state.params, self.mesh, False),
                              sharding.state_sharding(state.opt_state, self.mesh, True))
        return sharding.state_sharding(state, self.mesh, self.fsdp)

    # The steps trace inside the mesh context, so the Pallas kernels run per batch shard
    # (`kernels.batch_parallel`) instead of being gathered onto every device.
    def train_step(self, state: TrainState, batches: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        with jax.set_mesh(self.mesh):
            return self._jit_train_step(state, batches)

    def lower_train_step(self, state: TrainState, batches: Batch) -> jax.stages.Lowered:
        """The train step lowered for these shapes (`.compile().as_text()`: the HLO that runs)."""
        with jax.set_mesh(self.mesh):
            return self._jit_train_step.lower(state, batches)

    def eval_step(self, params: Stacked, batch: Batch) -> jax.Array:
        with jax.set_mesh(self.mesh):
            return self._jit_eval_step(params, batch)

    def init_state(self) -> TrainState:
        return self._init_state

    def train_batches(self, batches: np.ndarray | tuple[np.ndarray, np.ndarray] | dict[str, np.ndarray]) -> Batch:
        """Host batches [accum, b, n + 1] (or a pair: tokens and segment ids, packed documents;
        or a dict, `Batch`) -> device arrays split over the batch axis."""
        return jax.tree.map(lambda x: sharding.global_batch(x, sharding.batch_sharding(self.mesh, 1)), batches)

    def eval_batch(self, batch: np.ndarray | tuple[np.ndarray, np.ndarray] | dict[str, np.ndarray]) -> Batch:
        """Host batch [b, n + 1] (or tokens and segment ids, or a dict: `Batch`) -> device arrays
        split over the batch axis."""
        return jax.tree.map(lambda x: sharding.global_batch(x, sharding.batch_sharding(self.mesh, 0)), batch)

    def model(self, params: Stacked) -> nnx.Module:
        """A module view of `params` (for sampling and inspection)."""
        return self._module(self.layers.unstack(params))

    def _module(self, layer_params: nnx.State) -> nnx.Module:
        """The module over parameters already sliced into layers (`LayerStack.unstack`)."""
        return nnx.merge(self.graphdef, layer_params, self.rest)

    def per_layer_state(self) -> TrainState:
        """The state's shapes (`jax.ShapeDtypeStruct`) in the first layout (per-layer parameters,
        checkpoints that record none): what to restore such a checkpoint into, then `from_per_layer`."""
        def per_layer(stacked):
            params = self.layers.unstack(stacked)
            return TrainState(params, self.optimizer.init(params))

        shapes = jax.eval_shape(per_layer, self._init_state.params)
        shardings = self._state_sharding(shapes)
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)

    def from_per_layer(self, state: TrainState) -> TrainState:
        """A TrainState of per-layer parameters (and moments) in this layout, on this mesh."""
        stacked = TrainState(self.layers.stack(state.params), self.layers.stack_tree(state.opt_state))
        return jax.device_put(stacked, self.state_sharding)

    def stacked_apart_state(self) -> TrainState:
        """The state's shapes in the "layers stacked" layout (the keys' and values' compress
        networks apart): what to restore such a checkpoint into, then `from_stacked_apart`."""
        shapes = jax.eval_shape(self.layers.split_tree, self._init_state)
        shardings = self._state_sharding(shapes)
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)

    def from_stacked_apart(self, state: TrainState) -> TrainState:
        """A TrainState in the "layers stacked" layout -> this layout, on this mesh."""
        return jax.device_put(self.layers.join_tree(state), self.state_sharding)

    def layout_converters(self) -> dict[str | None, tuple[TrainState, Callable[[TrainState], TrainState]]]:
        """{earlier `STATE_LAYOUT`: (its state's shapes, its conversion into this layout)}, as
        `Checkpointer.restore_newest` takes them."""
        return {None: (self.per_layer_state(), self.from_per_layer),
                "layers stacked": (self.stacked_apart_state(), self.from_stacked_apart)}

    def _loss(self, params: Stacked, batch: Batch) -> jax.Array:  # batch [b, n + 1], or with segment ids
        return self._layer_loss(self.layers.unstack(params, joined=True), batch)

    def _layer_loss(self, params: nnx.State, batch: Batch) -> jax.Array:
        tokens, segment_ids, loss_mask = batch_parts(batch)
        # only the parts the batch has: a model of plain tokens need not take the keywords
        extras = {k: v for k, v in (("segment_ids", segment_ids), ("loss_mask", loss_mask)) if v is not None}
        return self._module(params)(tokens, return_loss=True, **extras)

    def _train_step(self, state: TrainState, batches: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        """batches [accum, b, n + 1] (or tokens and segment ids): the gradient is the mean over
        the micro-batches."""
        if self.context > 1:
            grads, loss = self._context_grads(state.params, batches)
        elif self._reduce_once(batches):
            grad_specs = self._grad_specs(state.params)
            per_device = jax.shard_map(functools.partial(self._device_grads, grad_specs=grad_specs),
                                       in_specs=(P(), P(None, sharding.DATA)), out_specs=(grad_specs, P()),
                                       check_vma=False)
            grads, loss = per_device(state.params, batches)
        else:
            grads, loss = self._mean_grads(state.params, batches)
        with jax.named_scope("optimizer"):  # (the scope names the step's kernels: bench/profile_step.py)
            grad_norm = optax.tree.norm(grads)
            updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            # A non-finite loss or gradient skips the update: the state stays as it was.
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            keep = lambda new, old: jnp.where(finite, new, old)
            new_state = TrainState(jax.tree.map(keep, params, state.params),
                                   jax.tree.map(keep, opt_state, state.opt_state))
        metrics = dict(loss=loss, bits_per_byte=bits_per_byte(loss), grad_norm=grad_norm, skipped=~finite)
        return new_state, metrics

    def _summed_grads(self, params: Stacked, batches: Batch, shares: jax.Array | None = None
                      ) -> tuple[Stacked, jax.Array]:
        """(gradient, loss), each summed over the micro-batches (a `lax.scan`). shares [accum]:
        weigh each micro-batch's loss and gradient (this device's share of the micro-batch).

        The stacked arrays are sliced into layers once, before the loop: sliced inside it, XLA
        copied every layer's compress-network weights (16 MiB each) once per micro-batch, 1.0 ms
        of a 25 ms seed step (B=4 x 4, H200); once per step saves 0.5 ms back to back."""
        layer_params = self.layers.unstack(params, joined=True)
        grad_fn = jax.value_and_grad(self._layer_loss)

        def micro_step(grad_sum, xs):
            batch, share = xs
            loss, grads = grad_fn(layer_params, batch)
            grads = self.layers.stack(grads, joined=True)  # then summed stacked: one fusion per kind of array
            if share is None:
                return jax.tree.map(jnp.add, grad_sum, grads), loss
            return jax.tree.map(lambda s, g: s + share * g, grad_sum, grads), share * loss

        zeros = jax.tree.map(jnp.zeros_like, params)
        grad_sum, losses = jax.lax.scan(micro_step, zeros, (batches, shares))
        return grad_sum, jnp.sum(losses)

    def _mean_grads(self, params: Stacked, batches: Batch) -> tuple[Stacked, jax.Array]:
        """(gradient, loss), each the mean over the micro-batches."""
        accum = jax.tree.leaves(batches)[0].shape[0]
        grad_sum, loss_sum = self._summed_grads(params, batches)
        return jax.tree.map(lambda g: g / accum, grad_sum), loss_sum / accum

    def _reduce_once(self, batches: Batch) -> bool:
        """Reduce the gradient over the devices once per step instead of once per micro-batch
        (`_device_grads`): data parallel, replicated state, a batch the devices divide."""
        shards = self.mesh.shape[sharding.DATA]
        return shards > 1 and not self.fsdp and all(x.shape[1] % shards == 0 for x in jax.tree.leaves(batches))

    def _device_grads(self, params: Stacked, batches: Batch, grad_specs: Any) -> tuple[Stacked, jax.Array]:
        """One device's part of the step (inside `jax.shard_map`): the gradients of its slices of
        the micro-batches summed locally, then one all-reduce (a reduce-scatter of the arrays
        whose optimizer state is split, with shard_optimizer). (Under plain SPMD, XLA reduced the
        whole gradient inside the accumulation loop, once per micro-batch: 2 GPUs 1.68x one GPU's
        tokens/s at B=4x4 T=512 on H200s, 1.81x with this. Reducing each layer's gradient in the
        last micro-batch's backward, to overlap the transfers, measured no faster on 2026-11-30 and
        slower on 2026-12-01: 1.66x/1.70x, XLA running the per-layer all-reduces one at a time
        between the backward's kernels; BENCHMARKS.md, session 24.) Each device's
        loss is weighed by its share of the micro-batch's counted targets, so the result is the mean
        over the whole micro-batch, as on one device (packed documents and loss masks count unevenly)."""
        accum = jax.tree.leaves(batches)[0].shape[0]
        counts = jax.vmap(target_count)(batches)  # [accum]
        shares = counts / jnp.maximum(jax.lax.psum(counts, sharding.DATA), 1.0)
        grad_sum, loss_sum = self._summed_grads(params, batches, shares)
        grad_sum = jax.tree.map(_reduce_to, grad_sum, grad_specs)
        return jax.tree.map(lambda g: g / accum, grad_sum), jax.lax.psum(loss_sum, sharding.DATA) / accum

    def _grad_specs(self, params: Stacked) -> Any:
        """How `_device_grads` leaves each gradient: whole on every device, or with
        shard_optimizer each device's part (the split of its optimizer state)."""
        n = self.mesh.shape[sharding.DATA]
        return jax.tree.map(lambda x: sharding.fsdp_spec(x.shape, n) if self.shard_optimizer else P(), params)

    def _eval_step(self, params: Stacked, batch: Batch) -> jax.Array:
        if self.context > 1:
            return self._context_grads(params, jax.tree.map(lambda x: x[None], batch), with_grads=False)
        return self._loss(params, batch)

    # -- context parallelism: each sequence split over the `context` axis (nsa_jax.context) ------

    def _context_grads(self, params: Stacked, batches: Batch, with_grads: bool = True):
        """(gradient, loss), or without with_grads the loss alone: each the mean over the
        micro-batches [accum, b, n + 1]. Every device takes its batch slice's part of each
        sequence (inputs and their shifted targets, in the zig-zag split of `nsa_jax.context`)."""
        tokens, segment_ids, loss_mask = batch_parts(batches)
        if segment_ids is not None:
            raise ValueError("context parallelism does not take packed documents (segment ids) yet")
        zigzag = context.order(tokens.shape[-1] - 1, self.context)  # each device: an early and a late chunk
        counted = (jnp.ones(tokens[..., 1:].shape, jnp.float32) if loss_mask is None
                   else loss_mask[..., 1:].astype(jnp.float32))
        split = P(None, sharding.DATA, sharding.CONTEXT)
        per_device = jax.shard_map(functools.partial(self._context_device_grads, with_grads=with_grads),
                                   in_specs=(P(), split, split, split), out_specs=(P(), P()) if with_grads else P(),
                                   check_vma=False)
        return per_device(params, *(x[..., zigzag] for x in (tokens[..., :-1], tokens[..., 1:], counted)))

    def _context_device_grads(self, params: Stacked, inputs: jax.Array, labels: jax.Array, counted: jax.Array,
                              with_grads: bool):
        """One device's part (inside `jax.shard_map`): its shards' summed losses over each
        micro-batch's counted targets on all devices, their gradient, both summed over the mesh."""
        axes = (sharding.DATA, sharding.CONTEXT)
        totals = jnp.maximum(jax.lax.psum(jnp.sum(counted, axis=(1, 2)), axes), 1.0)  # [accum]

        def loss(params, ids, targets, weights, total):
            losses = self._module(self.layers.unstack(params, joined=True)).token_losses(
                ids, targets, context_axis=sharding.CONTEXT)
            return jnp.sum(losses * weights) / total

        def micro_step(grad_sum, xs):
            if not with_grads:
                return grad_sum, loss(params, *xs)
            value, grads = jax.value_and_grad(loss)(params, *xs)
            return jax.tree.map(jnp.add, grad_sum, grads), value

        zeros = jax.tree.map(jnp.zeros_like, params) if with_grads else None
        grad_sum, losses = jax.lax.scan(micro_step, zeros, (inputs, labels, counted, totals))
        accum = inputs.shape[0]
        loss_mean = jax.lax.psum(jnp.sum(losses), axes) / accum
        if not with_grads:
            return loss_mean
        return jax.tree.map(lambda g: jax.lax.psum(g, axes) / accum, grad_sum), loss_mean


def tree_size(tree: Any) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))
