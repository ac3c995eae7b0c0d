"""Saved per-item predictions of an evaluated split, and pooling of cross-validation folds.

Public: save_predictions / load_predictions (DIR/eval/<split>_predictions.npz, one row
per scored item), recompute_metrics (the metrics of eval/<split>.json from that file),
pool_folds (one weighted AUPRC / AUROC over out-of-fold predictions, plus per-fold
values and their mean ± std). Fields and the pooling rule: docs/training.md "Saved
predictions".
"""

from __future__ import annotations

from collections.abc import Sequence
import os
import warnings

import numpy as np

from bihier_jax.training import metrics as metrics_lib

REQUIRED = ("example_id", "group", "chain_row", "residue_index", "prediction", "label",
            "weight")


def save_predictions(path: str, collected: dict[str, np.ndarray], *, task,
                     split: str, step: int, chain_row: np.ndarray | None = None,
                     residue_index: np.ndarray | None = None) -> str:
  """Writes the predictions file of one split; returns its path.

  Args:
    path: output .npz path (its folder is created).
    collected: `evaluation.collect_predictions` output (predictions, labels, weights,
      groups, ids; [n] each, predictions may be [n, C]).
    task: config.task (name, level, metrics, min_group_size).
    split: the split's name.
    step: the evaluated checkpoint's step.
    chain_row, residue_index: int[n] residue positions (node tasks); None for graphs.
  """
  n = int(np.asarray(collected["labels"]).shape[0])
  if chain_row is None:
    chain_row = np.full([n], -1, np.int32)
  if residue_index is None:
    residue_index = np.full([n], -1, np.int32)
  if len(chain_row) != n or len(residue_index) != n:
    raise ValueError(f"{path}: {len(residue_index)} residue positions for {n} items")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  np.savez_compressed(
      path,
      example_id=np.asarray(collected["ids"], str),
      group=np.asarray(collected["groups"], str),
      chain_row=np.asarray(chain_row, np.int32),
      residue_index=np.asarray(residue_index, np.int32),
      prediction=np.asarray(collected["predictions"], np.float32),
      label=np.asarray(collected["labels"], np.float32),
      weight=np.asarray(collected["weights"], np.float32),
      task_name=np.asarray(str(task.name)),
      task_level=np.asarray(str(task.level)),
      split=np.asarray(split),
      metrics=np.asarray([str(m) for m in task.metrics], str),
      min_group_size=np.int64(task.min_group_size),
      checkpoint_step=np.int64(step))
  return path


def load_predictions(path: str) -> dict[str, np.ndarray]:
  """A predictions file as a dict of arrays (no pickles); raises naming a missing field."""
  with np.load(path, allow_pickle=False) as data:
    out = {k: data[k] for k in data.files}
  missing = [k for k in REQUIRED if k not in out]
  if missing:
    raise ValueError(f"{path}: not a predictions file, missing {', '.join(missing)}")
  n = out["label"].shape[0]
  bad = [k for k in REQUIRED if out[k].shape[0] != n]
  if bad:
    raise ValueError(f"{path}: fields {', '.join(bad)} do not have {n} rows")
  return out


def recompute_metrics(preds: dict[str, np.ndarray], names: Sequence[str] | None = None
                      ) -> dict[str, float]:
  """The metrics of `DIR/eval/<split>.json` (minus loss), from a loaded predictions file."""
  names = list(names) if names is not None else [str(m) for m in preds["metrics"]]
  return metrics_lib.compute_metrics(
      names, predictions=preds["prediction"], labels=preds["label"],
      weights=preds["weight"], groups=preds["group"],
      min_group_size=int(preds.get("min_group_size", 1)))


def _check_binary(path: str, preds: dict[str, np.ndarray]) -> None:
  if preds["prediction"].ndim != 1:
    raise ValueError(f"{path}: predictions have shape {preds['prediction'].shape}; "
                     "pooled binary metrics need one probability per item")
  labels = preds["label"]
  if not np.all((labels == 0) | (labels == 1)):
    raise ValueError(f"{path}: labels are not all 0/1")


def pool_folds(paths: Sequence[str], metrics: Sequence[str] = ("auprc", "auroc")
               ) -> dict:
  """Pooled out-of-fold metrics of several predictions files (one per CV fold).

  Items are concatenated; an example id found in two files is an error naming it and
  both files (folds must be disjoint).

  Returns:
    {"pooled": {metric: value, "num_items", "num_examples", "weight_sum"},
     "per_fold": {path: {metric: value, "num_items", ...}},
     "per_fold_mean": {metric: mean}, "per_fold_std": {metric: sample std (ddof=1)},
     "per_fold_count": {metric: folds where it is defined (mean/std skip NaN folds)},
     "num_folds": n, "metrics": [...]}; NaN where a metric is undefined.
  """
  if not paths:
    raise ValueError("no predictions files given")
  unknown = [m for m in metrics if m not in metrics_lib.BINARY_METRICS]
  if unknown:
    raise ValueError(f"unknown pooled metric(s) {', '.join(unknown)}; known: "
                     f"{', '.join(metrics_lib.BINARY_METRICS)}")
  owner: dict[str, str] = {}
  parts, per_fold = [], {}
  for path in paths:
    preds = load_predictions(path)
    _check_binary(path, preds)
    for example in np.unique(preds["example_id"]).tolist():
      if example in owner:
        raise ValueError(f"example {example!r} is in both {owner[example]} and {path}; "
                         "out-of-fold predictions must come from disjoint folds")
      owner[example] = path
    parts.append(preds)
    per_fold[path] = _binary_metrics(preds, metrics)
  pooled = {k: np.concatenate([p[k] for p in parts])
            for k in ("example_id", "prediction", "label", "weight")}
  values = np.array([[per_fold[p][m] for m in metrics] for p in paths], np.float64)
  with np.errstate(all="ignore"), warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # a metric NaN in every fold
    mean = np.nanmean(values, axis=0)
    std = (np.nanstd(values, axis=0, ddof=1) if len(paths) > 1
           else np.full(len(metrics), np.nan))
  return {
      "metrics": list(metrics),
      "num_folds": len(paths),
      "pooled": _binary_metrics(pooled, metrics),
      "per_fold": per_fold,
      "per_fold_mean": {m: float(v) for m, v in zip(metrics, mean)},
      "per_fold_std": {m: float(v) for m, v in zip(metrics, std)},
      # Folds where the metric is defined (NaN folds, e.g. one class only, are skipped).
      "per_fold_count": {m: int(c) for m, c in
                         zip(metrics, np.isfinite(values).sum(axis=0))},
  }


def _binary_metrics(preds, metrics) -> dict[str, float]:
  out = {m: metrics_lib.BINARY_METRICS[m](preds["label"], preds["prediction"],
                                          preds["weight"]) for m in metrics}
  out["num_items"] = float(preds["label"].shape[0])
  out["num_examples"] = float(np.unique(preds["example_id"]).size)
  out["weight_sum"] = float(np.sum(preds["weight"], dtype=np.float64))
  return out
