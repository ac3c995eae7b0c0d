"""Epochs in steps: how many batches one pass over a split gives with the current packing.

Public: `estimate_epoch` -> `EpochEstimate` (simulates the packer, `packing.simulate`,
on the split's sizes.json over a few random orders), `batches_per_epoch`,
`resolve_epochs` (a copy of the config with its `EPOCH_FIELDS` turned into the step
fields the training loop reads: train.num_epochs -> train.num_steps, and so on; call it
before the optimizer and its schedule are built), `sub_batch_config`,
`accumulation_steps`, `simulate_batches`. Why an epoch is more steps than
records / batch_size, and how close the estimate comes: docs/data.md, "Epochs and
steps".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import ml_collections
import numpy as np

from bihier_jax.data import batch_plan
from bihier_jax.data import budgets as budgets_lib
from bihier_jax.data import packing
from bihier_jax.data.batch import PaddingBudget

EPOCH_FIELDS = (  # (group, epoch field, step field it sets)
    ("train", "num_epochs", "num_steps"),
    ("train", "eval_every_epochs", "eval_every"),
    ("train", "checkpoint_every_epochs", "checkpoint_every"),
    ("optim", "step_every_epochs", "step_every"),
)


@dataclasses.dataclass(frozen=True)
class EpochEstimate:
  """Expected figures of one pass over a split (means over the simulated seeds).

  Attributes:
    records: examples in the split.
    batches: padded batches the input pipelines of all hosts emit per pass, each of at
      most batch_size / (num_devices x grad_accum_steps) proteins.
    steps: training steps per pass: batches / (num_devices x grad_accum_steps).
    proteins_per_batch: real proteins in a padded batch (records / batches).
    proteins_per_step: real proteins per step (records / steps).
    batch_size: the config's global train.batch_size, for comparison.
  """
  records: int
  batches: float
  steps: float
  proteins_per_batch: float
  proteins_per_step: float
  batch_size: int


def accumulation_steps(config) -> int:
  """Micro-batches per update and device (`train.grad_accum_steps`, default 1)."""
  steps = int(config.train.get("grad_accum_steps", 1))
  if steps < 1:
    raise ValueError(f"train.grad_accum_steps must be >= 1, got {steps}")
  return steps


def sub_batch_config(config, num_devices: int) -> ml_collections.ConfigDict:
  """The config each input pipeline sees: train.batch_size = proteins per sub-batch,
  the global batch split over `num_devices` and `train.grad_accum_steps` micro-batches
  (evaluation uses the same sub-batch size, hence the same compiled shapes)."""
  parts = num_devices * accumulation_steps(config)
  if int(config.train.batch_size) % parts:
    raise ValueError(f"train.batch_size={config.train.batch_size} must be a multiple of "
                     f"the {num_devices} devices x train.grad_accum_steps="
                     f"{accumulation_steps(config)} (one padded sub-batch each)")
  sub = ml_collections.ConfigDict(config.to_dict())
  sub.train.batch_size = int(config.train.batch_size) // parts
  return sub


def simulate_batches(sizes: np.ndarray, budgets: Sequence[PaddingBudget], *,
                     max_residues: int, chunk_size: int, seed: int = 0) -> int:
  """Padded batches one random-order pass over `sizes` gives (all hosts together: the
  plan is one, `batch_plan`): chunks of `chunk_size` records packed bucket by bucket
  with the pipeline's own packing rule (`packing.simulate`)."""
  return len(packing.simulate(sizes, budgets, max_residues=max_residues,
                              chunk_size=chunk_size, seed=seed))


def estimate_epoch(config, data_dir: str | None = None, split: str | None = None, *,
                   num_devices: int = 1, seeds: Sequence[int] = (0, 1, 2),
                   budgets: Sequence[PaddingBudget] | None = None,
                   chunk_size: int | None = None) -> EpochEstimate:
  """Expected batches and proteins per batch of one training pass over a split.

  Args:
    config: the experiment config (global train.batch_size, data.*).
    data_dir: prepared records (default config.data.dir); needs <split>/sizes.json.
    split: default config.data.train_split.
    num_devices: devices over all hosts; each step takes train.grad_accum_steps
      batches of batch_size / (num_devices x grad_accum_steps) proteins per device (as
      the training loop's per-device config). How many hosts share them does not
      matter: every host plans the same batches.
    seeds: random record orders simulated; the figures are their means.
    budgets, chunk_size: as given to `make_dataset` (default: its defaults for the
      per-device config, i.e. budgets from every split's sizes).

  Raises:
    ValueError: no sizes.json for the split.
  """
  data_dir = data_dir or config.data.dir
  split = split or config.data.get("train_split", "train")
  sizes = budgets_lib.load_sizes(data_dir, split)
  if sizes is None or not len(sizes):
    raise ValueError(f"no {split}/sizes.json under {data_dir}: cannot count an epoch "
                     "(written by data_pipelines.preprocess)")
  sub = sub_batch_config(config, num_devices)
  if budgets is None:
    budgets = budgets_lib.bucket_budgets(sub, budgets_lib.dataset_sizes(data_dir))
  chunk = chunk_size or batch_plan.default_chunk_size(sub.train.batch_size)
  batches = float(np.mean([
      simulate_batches(sizes, budgets, max_residues=int(config.data.max_residues),
                       chunk_size=chunk, seed=s)
      for s in seeds]))
  steps = batches / (num_devices * accumulation_steps(config))
  return EpochEstimate(records=int(len(sizes)), batches=batches, steps=steps,
                       proteins_per_batch=len(sizes) / batches,
                       proteins_per_step=len(sizes) / steps,
                       batch_size=int(config.train.batch_size))


def batches_per_epoch(config, data_dir: str | None = None, split: str = "train", *,
                      num_devices: int = 1) -> float:
  """Expected training steps (global batches) in one pass over `split` (an estimate).

  With one device this is the number of padded batches `make_dataset` emits per epoch;
  with D devices, a step is D such batches of batch_size / D proteins each. See
  `estimate_epoch` for the proteins per batch.
  """
  return estimate_epoch(config, data_dir, split, num_devices=num_devices).steps


def resolve_epochs(config, data_dir: str | None = None, *, num_devices: int = 1
                   ) -> ml_collections.ConfigDict:
  """A copy of `config` with its epoch fields (EPOCH_FIELDS) turned into step counts.

  Each used field (present and > 0) sets its step field to round(epochs x steps per
  epoch), at least 1, with steps per epoch from `batches_per_epoch` on
  config.data.train_split; train.steps_per_epoch records that figure. Without any
  epoch field the copy equals the config.

  Args:
    config: the global experiment config.
    data_dir: prepared records (default config.data.dir).
    num_devices: as the run will use (jax.device_count(), every host's).
  """
  out = ml_collections.ConfigDict(config.to_dict())
  used = [(group, field, target) for group, field, target in EPOCH_FIELDS
          if group in out and float(out[group].get(field, 0) or 0) > 0]
  if not used:
    return out
  steps = batches_per_epoch(config, data_dir, config.data.get("train_split", "train"),
                            num_devices=num_devices)
  for group, field, target in used:
    out[group][target] = max(1, int(round(float(out[group][field]) * steps)))
  out.train.steps_per_epoch = float(steps)
  return out
