"""Optimizer: AdamW with warmup + cosine/step schedule, clipping, ESM learning-rate policy.

Parameters are split into groups with `optax.multi_transform`:
- `default`: everything outside `params['esm']`, at `optim.learning_rate`;
- `esm`: the ESM-2 branch, at `optim.esm_lr_ratio` x that rate (`model.esm.trainable`
  = finetune), or untouched (`frozen`), or only its last `model.esm.last_n` layers plus
  the final LayerNorm (`last_n`): the stacked layer leaves (leading axis = layer index)
  get a per-layer 0/1 mask on their updates, so earlier layers never move;
- `frozen`: zero updates (`optax.set_to_zero`).
Weight decay applies to kernels and embeddings only (not biases or LayerNorm scales).
Gradients are clipped by their global norm before the split.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

ESM_KEY = "esm"
ESM_LAYERS_KEY = "layers"
_DECAYED = ("kernel", "embedding")


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup to `optim.learning_rate`, then cosine to 0, step decay or constant."""
  o = config.optim
  warmup = int(o.warmup_steps)
  total = int(config.train.num_steps)
  if o.schedule == "cosine":
    main = optax.cosine_decay_schedule(o.learning_rate, max(total - warmup, 1))
  elif o.schedule == "step":
    main = optax.exponential_decay(o.learning_rate, transition_steps=int(o.step_every),
                                   decay_rate=o.step_factor, staircase=True)
  elif o.schedule == "constant":
    main = optax.constant_schedule(o.learning_rate)
  else:
    raise ValueError(f"optim.schedule must be cosine | step | constant, got "
                     f"{o.schedule!r}")
  if warmup <= 0:
    return main
  ramp = optax.linear_schedule(0.0, o.learning_rate, warmup)
  return optax.join_schedules([ramp, main], [warmup])


def _path_keys(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def param_labels(params: Any, trainable: str) -> Any:
  """Pytree of group labels ('default' | 'esm' | 'esm_layers' | 'frozen') like params."""
  if trainable not in ("frozen", "finetune", "last_n"):
    raise ValueError(f"model.esm.trainable must be frozen | finetune | last_n, got "
                     f"{trainable!r}")

  def label(path, _):
    keys = _path_keys(path)
    if not keys or keys[0] != ESM_KEY:
      return "default"
    if trainable == "frozen":
      return "frozen"
    if trainable == "finetune":
      return "esm"
    if ESM_LAYERS_KEY in keys:
      return "esm_layers"
    # last_n: the final LayerNorm (after the last layers) trains; embeddings stay.
    return "esm" if any("after" in k or "final" in k for k in keys) else "frozen"

  return jax.tree_util.tree_map_with_path(label, params)


def _decay_mask(params: Any) -> Any:
  return jax.tree_util.tree_map_with_path(
      lambda path, _: _path_keys(path)[-1] in _DECAYED if path else False, params)


def mask_leading_layers(last_n: int) -> optax.GradientTransformation:
  """Zeroes updates of all but the last `last_n` entries along each leaf's axis 0."""

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params

    def mask(u):
      num_layers = u.shape[0]
      keep = jnp.arange(num_layers) >= num_layers - last_n
      return u * keep.reshape((num_layers,) + (1,) * (u.ndim - 1)).astype(u.dtype)

    return jax.tree_util.tree_map(mask, updates), state

  return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(config: ml_collections.ConfigDict, params: Any
                   ) -> optax.GradientTransformation:
  """The full optimizer for `params` (a pytree with an optional 'esm' subtree)."""
  o = config.optim
  schedule = learning_rate_schedule(config)
  esm_schedule = lambda step: schedule(step) * o.esm_lr_ratio

  def adamw(lr):
    return optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=o.weight_decay,
                       mask=_decay_mask)

  transforms = {
      "default": adamw(schedule),
      "esm": adamw(esm_schedule),
      "esm_layers": optax.chain(adamw(esm_schedule),
                                mask_leading_layers(int(config.model.esm.last_n))),
      "frozen": optax.set_to_zero(),
  }
  labels = param_labels(params, config.model.esm.trainable)
  used = set(jax.tree_util.tree_leaves(labels))
  transforms = {k: v for k, v in transforms.items() if k in used} or {
      "default": transforms["default"]}
  chain = []
  if o.grad_clip and o.grad_clip > 0:
    chain.append(optax.clip_by_global_norm(o.grad_clip))
  chain.append(optax.multi_transform(transforms, labels))
  return optax.chain(*chain)
