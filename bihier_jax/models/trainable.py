"""Which parameters train: the one place that decides it (`model.esm.trainable`,
`POLICIES`: finetune, frozen, last_n, lora). `Trainable` is read by both halves of a
step: the model (`esm_overrides` sets `esm2.ESM2Config.frozen_*`, so frozen parameters
enter as constants) and the optimizer (`Trainable.select` / `apply_updates`: clipping,
the gradient norm, the non-finite check and Adam see only trainable parameters);
`is_adapter` marks LoRA's parameters. Everything outside params['esm'] always trains.
The policies and what "frozen" means: docs/model.md "What frozen means".
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax
import jax
import jax.numpy as jnp

from bihier_jax.models import esm2

POLICIES = ("frozen", "finetune", "last_n", "lora")
ESM_KEY = "esm"  # the ESM-2 subtree of the fusion model's parameters


def is_adapter(path: tuple[str, ...]) -> bool:
  """A LoRA adapter (params['esm']['lora'][...], path of dict keys): trains under every
  policy that has adapters, in its own optimizer group (`training.optim`)."""
  return tuple(path[:2]) == (ESM_KEY, esm2.LORA_PARAM)


def _flat(tree) -> dict[tuple[str, ...], Any]:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))


@dataclasses.dataclass(frozen=True)
class Trainable:
  """The trainability policy of one model.

  Attributes:
    policy: frozen | finetune | last_n.
    num_esm_layers: S, layers of the ESM-2 branch.
    last_n: layers trained under last_n (1..S).
    lora_rank, lora_alpha, lora_targets: the adapters under lora.
  """
  policy: str = "finetune"
  num_esm_layers: int = 0
  last_n: int = 0
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = ("q", "v")

  def __post_init__(self):
    if self.policy not in POLICIES:
      raise ValueError(f"model.esm.trainable must be one of {' | '.join(POLICIES)}, "
                       f"got {self.policy!r}")
    if self.policy == "last_n" and not 1 <= self.last_n <= self.num_esm_layers:
      raise ValueError(f"model.esm.last_n={self.last_n} must lie in 1..{self.num_esm_layers}"
                       f" (the ESM-2 layers) with model.esm.trainable=last_n")
    if self.policy == "lora" and self.lora_rank < 1:
      raise ValueError(f"model.esm.lora_rank={self.lora_rank} must be >= 1 with "
                       "model.esm.trainable=lora")

  @classmethod
  def from_config(cls, config) -> "Trainable":
    """From `config.model.esm` (trainable, last_n, preset)."""
    esm = config.model.esm
    num_layers = esm2.config_from_preset(esm.preset).num_layers
    return cls(policy=esm.trainable, num_esm_layers=num_layers, last_n=int(esm.last_n),
               lora_rank=int(esm.get("lora_rank", 0)),
               lora_alpha=float(esm.get("lora_alpha", 16.0)),
               lora_targets=tuple(esm.get("lora_targets", ("q", "v"))))

  @property
  def first_trainable_layer(self) -> int:
    """0-based index of the first ESM layer that trains (S: none does)."""
    if self.policy == "finetune":
      return 0
    if self.policy in ("frozen", "lora"):
      return self.num_esm_layers
    return self.num_esm_layers - self.last_n

  def esm_overrides(self) -> dict[str, Any]:
    """`esm2.ESM2Config` fields that make the frozen ESM parameters constants."""
    lora = ({"lora_rank": self.lora_rank, "lora_alpha": self.lora_alpha,
             "lora_targets": self.lora_targets} if self.policy == "lora" else {})
    return {"frozen_embedding": self.policy != "finetune",
            "frozen_layers": self.first_trainable_layer,
            "frozen_final_norm": self.policy in ("frozen", "lora"), **lora}

  def start(self, path: tuple[str, ...]) -> int | None:
    """Where a parameter (path of dict keys) trains from: None = frozen, 0 = the whole
    leaf, k > 0 = entries k.. along axis 0 (stacked ESM layers under last_n)."""
    if not path or path[0] != ESM_KEY or self.policy == "finetune":
      return 0
    if is_adapter(path):
      return 0  # adapters exist only under lora, and always train
    part = path[1] if len(path) > 1 else ""
    if self.policy in ("frozen", "lora"):
      return None
    if part == esm2.LAYERS_PARAM:
      return self.first_trainable_layer
    return 0 if part == esm2.FINAL_NORM_PARAM else None

  def select(self, tree) -> dict:
    """The trainable parts of a parameter-shaped tree (params, gradients, updates), as
    nested dicts; frozen leaves are left out, partly trained leaves sliced."""
    out = {}
    for path, leaf in _flat(tree).items():
      start = self.start(path)
      if start is not None:
        out[path] = leaf if start == 0 else leaf[start:]
    return flax.traverse_util.unflatten_dict(out)

  def merge(self, view, params) -> dict:
    """params with their trainable parts taken from `view` (a `select`-shaped tree):
    differentiating through it w.r.t. `view` gives the trainable parameters' gradient
    with the rest of `params` held constant."""
    flat = _flat(params)
    for path, part in _flat(view).items():
      start = self.start(path)
      flat[path] = part if start == 0 else jnp.concatenate(
          [jax.lax.stop_gradient(jnp.asarray(flat[path])[:start]), part])
    return flax.traverse_util.unflatten_dict(flat)

  def apply_updates(self, params, updates) -> dict:
    """params with `updates` (a `select`-shaped tree) added to their trainable parts;
    each result keeps its parameter's dtype."""
    flat = _flat(params)
    for path, update in _flat(updates).items():
      p, start = flat[path], self.start(path)
      p = jnp.asarray(p)
      flat[path] = ((p + update) if start == 0 else p.at[start:].add(update)
                    ).astype(p.dtype)
    return flax.traverse_util.unflatten_dict(flat)

  def count(self, params) -> tuple[int, int]:
    """(trainable, total) numbers of parameter entries."""
    total = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params))
    trained = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(
        self.select(params)))
    return trained, total
