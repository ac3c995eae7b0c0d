"""The state a training run updates and checkpoints, created fresh or as shapes.

Public: TrainState (parameters, optimizer state, step, RNG key, non-finite counters),
create_train_state (fresh parameters, pretrained ESM-2 if configured, laid out on the
mesh), abstract_train_state (the same as ShapeDtypeStructs, to restore a checkpoint).
"""

from __future__ import annotations

from typing import Any

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from bihier_jax import models
from bihier_jax.data.batch import Batch
from bihier_jax.training import mesh as mesh_lib
from bihier_jax.training import optim


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint must hold to continue a run exactly."""
  step: Any  # int32 [] updates attempted (skipped non-finite ones included)
  params: Any
  opt_state: Any
  rng: Any  # uint32 [2] raw key data of the run's base key
  nonfinite_streak: Any  # int32 [] consecutive skipped steps
  nonfinite_total: Any  # int32 [] skipped steps so far


def create_train_state(config: ml_collections.ConfigDict, model, sample_batch: Batch,
                       mesh: jax.sharding.Mesh, *, load_esm: bool = True
                       ) -> tuple[TrainState, optax.GradientTransformation]:
  """Fresh parameters (pretrained ESM if configured) and optimizer state, laid out on
  `mesh` (`mesh_lib.state_shardings`: replicated, ESM layer matrices split over 'fsdp')."""
  from bihier_jax import models  # pylint: disable=g-import-not-at-top
  key = jax.random.key(config.seed)
  init_key = jax.random.fold_in(key, 0x1217)
  init = lambda k, b: model.init(k, b, deterministic=True)["params"]
  param_shardings = mesh_lib.state_shardings(jax.eval_shape(init, init_key, sample_batch),
                                             mesh)
  params = jax.jit(init, out_shardings=param_shardings)(init_key, sample_batch)
  if "esm" in params and load_esm:
    if config.model.esm.checkpoint:
      params = models.load_pretrained_esm(jax.device_get(params),
                                          config.model.esm.checkpoint)
      params = jax.device_put(params, param_shardings)
      logging.info("ESM weights loaded from %s", config.model.esm.checkpoint)
    else:
      message = ("model.esm.checkpoint is empty: the ESM-2 branch starts from RANDOM "
                 "weights (preset %r), so it is no pretrained language model. Set "
                 "--config.model.esm.checkpoint=PATH for real runs.")
      logging.warning("!" * 80)
      logging.warning(message, config.model.esm.preset)
      logging.warning("!" * 80)
      if jax.process_index() == 0:
        print("WARNING: " + message % config.model.esm.preset, flush=True)
  tx = optim.make_optimizer(config)
  trainable = model.config.trainable
  trained, total = trainable.count(params)
  logging.info("trainable parameters: %d of %d (model.esm.trainable=%s)", trained, total,
               trainable.policy)
  init_opt = lambda p: tx.init(trainable.select(p))
  opt_state = jax.jit(init_opt, out_shardings=mesh_lib.state_shardings(
      jax.eval_shape(init_opt, params), mesh))(params)
  state = TrainState(
      step=jnp.zeros([], jnp.int32), params=params, opt_state=opt_state,
      rng=jax.random.key_data(key), nonfinite_streak=jnp.zeros([], jnp.int32),
      nonfinite_total=jnp.zeros([], jnp.int32))
  return jax.device_put(state, mesh_lib.state_shardings(state, mesh)), tx


def abstract_train_state(config, model, sample_batch, mesh):
  """ShapeDtypeStructs (with shardings) of the TrainState, without computing it."""
  tx_holder = {}

  def make():
    state, tx = create_train_state(config, model, sample_batch, mesh, load_esm=False)
    tx_holder["tx"] = tx
    return state

  shapes = jax.eval_shape(make)
  return jax.tree_util.tree_map(
      lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
      shapes, mesh_lib.state_shardings(shapes, mesh))
