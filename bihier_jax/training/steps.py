"""The jitted, data-parallel training and evaluation steps.

`loss_and_grads` / `train_step` / `eval_step` take a device-stacked batch [D, ...]
(one padded sub-batch per device) and run as one `jax.shard_map` program per device of
the ('data', 'fsdp') mesh (see `mesh` for the design: the batch is split over every
device, the large ESM layer matrices and their optimizer moments over 'fsdp');
`jit_train_step` / `jit_eval_step` bind them to a model, task and mesh; the state they
update is `train_state.TrainState`.

Faults: the step skips the update in-graph when the loss or any gradient is not finite
and counts it in the state (the loop in `train_lib` decides when to stop).
"""

from __future__ import annotations

import functools

from absl import logging
import jax
import jax.numpy as jnp
import optax

from bihier_jax.data.batch import Batch
from bihier_jax.models import fsdp
from bihier_jax.training import mesh as mesh_lib
from bihier_jax.training.train_state import TrainState


def _sub_batch_keys(step_key, num):
  return jax.vmap(lambda i: jax.random.fold_in(step_key, i))(jnp.arange(num))


def _each_sub_batch(fn, block):
  """fn on every sub-batch of a [d, ...] block, one after another (lax.map), so peak
  activation memory is one sub-batch's; a single sub-batch is squeezed and run as is."""
  count = jax.tree_util.tree_leaves(block)[0].shape[0]
  if count == 1:
    out = fn(jax.tree_util.tree_map(lambda x: x[0], block))
    return jax.tree_util.tree_map(lambda x: x[None], out)
  return jax.lax.map(fn, block)


def _log_attention(model, batch: Batch) -> None:
  """Logs the ESM attention a step runs (`attention_backends.describe_attention`); called while the
  step is traced, so once per compiled program."""
  cfg = model.config
  if not getattr(cfg, "uses_esm", False):
    return
  from bihier_jax.models import attention_backends  # pylint: disable=g-import-not-at-top
  rows, length = batch.tokens.shape[-2:]
  logging.info("ESM attention: %s", attention_backends.describe_attention(
      cfg.esm, rows, length, batch.packed_rows))


def _data_parallel(body, mesh, out_specs):
  """body(params, *stacked, axis_name=...) as one program per device of `mesh`
  (shard_map over all its axes: params laid out by `mesh_lib.param_specs`, stacked
  arrays split on their leading device axis over every device), or as is on the whole
  stack when there is no mesh (axis_name=None). While the body is traced,
  `fsdp.gathering` is active with the mesh's 'fsdp' size."""
  if mesh is None:
    return functools.partial(body, axis_name=None)
  spec = jax.sharding.PartitionSpec
  axes = mesh_lib.batch_axes(mesh)

  def traced(*args):
    with fsdp.gathering(mesh_lib.fsdp_size(mesh)):
      return body(*args, axis_name=axes)

  return lambda params, *stacked: jax.shard_map(
      traced, mesh=mesh,
      in_specs=(mesh_lib.param_specs(params, mesh),) + (spec(axes),) * len(stacked),
      out_specs=out_specs,
      check_vma=True)(params, *stacked)


def _unsplit_axes(spec, axes: tuple[str, ...]) -> tuple[str, ...]:
  """The mesh axes of `axes` a leaf with PartitionSpec `spec` is NOT split over."""
  used = {a for part in spec for a in ((part,) if isinstance(part, str) else part or ())}
  return tuple(a for a in axes if a not in used)


def _context_mesh(mesh):
  """`mesh`, else the mesh set with jax.set_mesh if it has a 'data' or 'fsdp' axis,
  else None."""
  if mesh is not None:
    return mesh
  context = jax.sharding.get_abstract_mesh()
  if not context.empty and mesh_lib.batch_axes(context):
    return context
  return None


def loss_and_grads(params, batch: Batch, rng, step, *, model, task, mesh=None):
  """Global-batch loss and the gradients of the trainable parameters, for a
  device-stacked batch [M, ...] of M sub-batches.

  loss = Σ_m loss_m·W_m / Σ_m W_m, W_m = label weight of sub-batch m: the weighted mean
  over the whole global batch, as `heads.loss` defines it for one batch. Sub-batch m
  draws dropout/augmentation keys from fold_in(fold_in(key(rng), step), m), so the
  result does not depend on how the device axis is sharded.

  Each device runs the unbatched model on its own sub-batches, one after another, and
  takes each one's gradient before the next (gradient accumulation: M = devices x
  train.grad_accum_steps, and activation memory is one sub-batch's); the sums are
  `psum`med over 'data' when there is a mesh (`mesh`, or a context mesh with a 'data'
  axis). Gradients are taken w.r.t. `model.config.trainable.select(params)`; frozen
  parameters are constants.

  Returns:
    ((loss, aux), grads) with aux = {accuracy (weighted, softmax tasks), label_weight}
    and grads shaped like the trainable view.
  """
  from bihier_jax.models import bihier, heads  # pylint: disable=g-import-not-at-top
  _log_attention(model, batch)
  trainable = model.config.trainable
  num_sub = batch.node_mask.shape[0]
  step_key = jax.random.fold_in(jax.random.wrap_key_data(rng), step)
  key_data = jax.random.key_data(_sub_batch_keys(step_key, num_sub))

  def weighted_sums(view, params, sub_batch, key):
    """(Σ w·loss, (Σ w, Σ w·correct)) of one sub-batch; unlabelled ones add zero."""
    dropout_key, augment_key = jax.random.split(jax.random.wrap_key_data(key))
    out = model.apply({"params": trainable.merge(view, params)}, sub_batch,
                      deterministic=False,
                      rngs={"dropout": dropout_key, "augment": augment_key})
    loss, aux = heads.loss(task, out.logits, sub_batch)
    weight = aux["weight_sum"]
    used = weight > 0  # a 0/0 loss must not leak in
    return (jnp.where(used, loss, 0.0) * weight,
            (weight, jnp.where(used, aux.get("accuracy", 0.0), 0.0) * weight))

  grad_fn = jax.value_and_grad(weighted_sums, has_aux=True)

  mesh = _context_mesh(mesh)
  view_specs = (None if mesh is None else mesh_lib.param_specs(
      jax.eval_shape(trainable.select, params), mesh))

  def body(params, block, key_block, *, axis_name):
    view = trainable.select(params)
    if axis_name is not None:
      # Per-device gradients, summed below with the other sums (an invariant `view`
      # would have its cotangent psum'd by JAX itself, twice in all). Leaves split over
      # 'fsdp' already vary there; their gradients come back reduce-scattered.
      view = jax.tree_util.tree_map(
          lambda p, spec: jax.lax.pcast(p, _unsplit_axes(spec, axis_name), to="varying")
          if _unsplit_axes(spec, axis_name) else p, view, view_specs)

    def one(args):
      # The backward pass at the model's matmul precision too (custom VJP rules are
      # traced here, outside the model's own scope).
      with bihier.matmul_precision_scope(model.config.matmul_precision):
        (loss_w, (weight, accuracy_w)), grads = grad_fn(view, params, *args)
      # Summed over sub-batches and devices in float32, whatever the parameter dtype.
      return loss_w, weight, accuracy_w, jax.tree_util.tree_map(
          lambda g: g.astype(jnp.float32), grads)

    # The first sub-batch starts the sums (so they carry this device's values), the
    # others are added one after another.
    sums = one(jax.tree_util.tree_map(lambda x: x[0], (block, key_block)))
    if jax.tree_util.tree_leaves(block)[0].shape[0] > 1:
      rest = jax.tree_util.tree_map(lambda x: x[1:], (block, key_block))
      sums, _ = jax.lax.scan(
          lambda total, args: (jax.tree_util.tree_map(jnp.add, total, one(args)), None),
          sums, rest)
    loss_sum, total, accuracy_sum, grads = sums
    if axis_name is not None:
      loss_sum, total, accuracy_sum = jax.lax.psum((loss_sum, total, accuracy_sum),
                                                   axis_name)
      grads = jax.tree_util.tree_map(
          lambda g, spec: jax.lax.psum(g, _unsplit_axes(spec, axis_name))
          if _unsplit_axes(spec, axis_name) else g, grads, view_specs)
    scale = jnp.where(total > 0, 1.0 / jnp.maximum(total, 1e-12), 0.0)
    grads = jax.tree_util.tree_map(lambda g, p: (g * scale).astype(p.dtype), grads, view)
    return loss_sum * scale, accuracy_sum * scale, total, grads

  scalar = jax.sharding.PartitionSpec()
  loss, accuracy, total, grads = _data_parallel(
      body, mesh, out_specs=(scalar, scalar, scalar, view_specs))(
          params, batch, key_data)
  return (loss, {"accuracy": accuracy, "label_weight": total}), grads


def train_step(state: TrainState, batch: Batch, *, model, tx, task, mesh=None
               ) -> tuple[TrainState, dict[str, jnp.ndarray]]:
  """One data-parallel update on a device-stacked batch [M, ...] (see loss_and_grads).

  Only the trainable parameters (`model.config.trainable`, see
  `bihier_jax.models.trainable`) are seen by the gradient norm, the non-finite check
  and `tx` (an `optim.make_optimizer` transformation over trainable views).
  A non-finite loss or gradient leaves parameters and optimizer state unchanged
  (in-graph select) and is counted in nonfinite_streak / nonfinite_total.
  """
  trainable = model.config.trainable
  (loss, aux), grads = loss_and_grads(state.params, batch, state.rng, state.step,
                                      model=model, task=task, mesh=mesh)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  def update(params, opt_state):
    updates, new_opt_state = tx.update(grads, opt_state, trainable.select(params))
    return trainable.apply_updates(params, updates), new_opt_state

  # The update runs only when finite (a cond, not a select of both results: selecting
  # would keep new and old parameters and moments alive together, ~3 state-sized
  # temporaries at the step's peak).
  new_params, new_opt_state = jax.lax.cond(
      finite, update, lambda params, opt_state: (params, opt_state), state.params,
      state.opt_state)
  new_state = state.replace(
      step=state.step + 1,
      params=new_params,
      opt_state=new_opt_state,
      nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
      nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32))
  step_metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite,
                  "nonfinite_streak": new_state.nonfinite_streak,
                  "nonfinite_total": new_state.nonfinite_total, **aux}
  return new_state, step_metrics


def eval_step(params, batch: Batch, *, model, task, mesh=None
              ) -> dict[str, jnp.ndarray]:
  """Deterministic forward on [D, ...]: predictions, embeddings, per-sub-batch loss
  (each device runs its own sub-batches unbatched when there is a mesh, as in
  loss_and_grads)."""
  from bihier_jax.models import heads  # pylint: disable=g-import-not-at-top
  _log_attention(model, batch)

  def body(params, block, *, axis_name):
    del axis_name  # per-device outputs stay on their device

    def one(sub_batch):
      out = model.apply({"params": params}, sub_batch, deterministic=True)
      loss, aux = heads.loss(task, out.logits, sub_batch)
      return {"predictions": heads.predictions(task, out.logits), "loss": loss,
              "weight_sum": aux["weight_sum"], "node_embeddings": out.node_embeddings,
              "graph_embeddings": out.graph_embeddings}
    return _each_sub_batch(one, block)

  mesh = _context_mesh(mesh)
  return _data_parallel(body, mesh, out_specs=None if mesh is None else
                        jax.sharding.PartitionSpec(mesh_lib.batch_axes(mesh)))(
                            params, batch)


def jit_train_step(model, tx, task, mesh, state: TrainState):
  """train_step jitted for `mesh`; `state` (arrays or abstract) gives the state's
  layout (`mesh_lib.state_shardings`), kept from step to step."""
  shardings = mesh_lib.state_shardings(state, mesh)
  return jax.jit(functools.partial(train_step, model=model, tx=tx, task=task,
                                   mesh=mesh),
                 in_shardings=(shardings, mesh_lib.batch_sharding(mesh)),
                 out_shardings=(shardings, mesh_lib.replicated(mesh)), donate_argnums=0)


def jit_eval_step(model, task, mesh):
  """eval_step jitted for `mesh`; parameters come laid out as training left them
  (`mesh_lib.localize`)."""
  return jax.jit(functools.partial(eval_step, model=model, task=task, mesh=mesh),
                 out_shardings=mesh_lib.batch_sharding(mesh))
