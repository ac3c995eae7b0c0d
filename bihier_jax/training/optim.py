"""Optimizer: AdamW with warmup + cosine/step/constant schedule (SCHEDULES), clipping,
ESM and LoRA learning-rate ratios.

It works on the trainable parameters only (`trainable.Trainable.select` views), so
clipping, Adam's moments and weight decay cover exactly what trains; groups `default`,
`esm` (optim.esm_lr_ratio) and, with LoRA, `lora` (optim.lora_lr_ratio). Weight decay
applies to parameters with two or more axes per layer (kernels, embedding tables).
Public: make_optimizer, learning_rate_schedule, SCHEDULES. Rules: docs/training.md
"Optimisation".
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

from bihier_jax.models import esm2
from bihier_jax.models import trainable as trainable_lib

SCHEDULES = ("cosine", "step", "constant")  # optim.schedule, after the warmup


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
    raise ValueError(f"optim.schedule must be {' | '.join(SCHEDULES)}, got "
                     f"{o.schedule!r}")
  if warmup <= 0:
    return main
  ramp = optax.linear_schedule(0.0, o.learning_rate, warmup)
  return optax.join_schedules([ramp, main], [warmup])


def _path_keys(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def param_group(path: tuple[str, ...]) -> str:
  """The optimizer group of a parameter (path of dict keys): 'lora' | 'esm' | 'default'."""
  if trainable_lib.is_adapter(path):
    return "lora"
  return "esm" if path[:1] == (trainable_lib.ESM_KEY,) else "default"


def param_labels(tree: Any) -> Any:
  """Pytree of group labels (`param_group`) like `tree` (a trainable view)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: param_group(_path_keys(path)), tree)


def decayed(path: tuple[str, ...], leaf) -> bool:
  """Weight decay for weight matrices and embeddings only.

  A parameter decays if it has two or more axes per layer (stacked ESM-2 layer leaves
  carry a leading layer axis) and is not a bias (`bias`, `*_bias`, e.g. ProNet's
  `conv_lin_l_bias` [3, h])."""
  stacked = path[:1] == (trainable_lib.ESM_KEY,) and esm2.LAYERS_PARAM in path[1:2]
  per_layer_axes = leaf.ndim - (1 if stacked else 0)
  return per_layer_axes >= 2 and not path[-1].endswith("bias")


def _decay_mask(tree: Any) -> Any:
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: decayed(_path_keys(path), leaf), tree)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The optimizer over trainable views (`Trainable.select` trees) of the parameters."""
  o = config.optim
  schedule = learning_rate_schedule(config)
  ratio_schedule = lambda ratio: (lambda step: schedule(step) * ratio)

  def adamw(lr):
    return optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=o.weight_decay,
                       mask=_decay_mask)

  chain = []
  if o.grad_clip and o.grad_clip > 0:
    chain.append(optax.clip_by_global_norm(o.grad_clip))
  groups = {"default": adamw(schedule), "esm": adamw(ratio_schedule(o.esm_lr_ratio))}
  if config.model.esm.trainable == "lora":  # other runs keep their two-group state
    # Saved configs from before the field existed: the default.
    groups["lora"] = adamw(ratio_schedule(o.get("lora_lr_ratio", 1.0)))
  chain.append(optax.multi_transform(groups, param_labels))
  return optax.chain(*chain)
