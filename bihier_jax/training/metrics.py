"""Evaluation metrics, host-side numpy: one definition per metric name.

Every function takes flat arrays of one split (all residues or all proteins) and returns
a float; NaN where the metric is undefined (a constant input for a correlation, one class
only for AUPRC/AUROC). Conventions follow the benchmarks' own evaluators: Spearman on
average ranks, Kendall τ-b, per-target means over groups of at least `min_group_size`,
`auprc` as ScanNet's trapezoidal weighted PR area (`average_precision` is the step-wise
sum; the two differ). `compute_metrics` maps the names used in configs and eval JSON
files to these; ALL lists them. Definitions: docs/training.md "Metrics".
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Names `compute_metrics` understands (a config's task.metrics picks among them).
CLASSIFICATION = ("accuracy", "majority_accuracy")
CORRELATION_GLOBAL = ("pearson_global", "spearman_global", "kendall_global")
CORRELATION_PER_TARGET = ("pearson_per_target", "spearman_per_target",
                          "kendall_per_target")
REGRESSION = ("rmse", "pearson", "spearman", "kendall")
BINARY = ("auprc", "average_precision", "auroc")
# `<binary metric>_per_group` adds `<metric>/<group>` for every group (PPBS subsets).
PER_GROUP = tuple(f"{name}_per_group" for name in BINARY)
ALL = (CLASSIFICATION + CORRELATION_GLOBAL + CORRELATION_PER_TARGET + REGRESSION
       + BINARY + PER_GROUP)


# --- ranks and correlations -------------------------------------------------------------

def average_ranks(x: np.ndarray) -> np.ndarray:
  """1-based ranks of x [n], ties get the mean of the ranks they span."""
  x = np.asarray(x, np.float64)
  order = np.argsort(x, kind="mergesort")
  sorted_x = x[order]
  # Start index of each run of equal values in sorted order.
  is_start = np.r_[True, sorted_x[1:] != sorted_x[:-1]]
  run_id = np.cumsum(is_start) - 1
  run_start = np.flatnonzero(is_start)
  run_end = np.r_[run_start[1:], x.size]  # exclusive
  mean_rank = (run_start + run_end + 1) / 2.0  # mean of 1-based ranks start+1..end
  ranks = np.empty(x.size, np.float64)
  ranks[order] = mean_rank[run_id]
  return ranks


def pearson(x: np.ndarray, y: np.ndarray) -> float:
  """Pearson r of x, y [n]; NaN when n < 2 or either is constant."""
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  if x.size < 2 or np.all(x == x[0]) or np.all(y == y[0]):
    return float("nan")
  dx = x - x.mean()
  dy = y - y.mean()
  denom = np.sqrt(np.dot(dx, dx) * np.dot(dy, dy))
  if denom == 0.0:
    return float("nan")
  return float(np.clip(np.dot(dx, dy) / denom, -1.0, 1.0))


def spearman(x: np.ndarray, y: np.ndarray) -> float:
  """Spearman ρ: Pearson r of average ranks."""
  if np.asarray(x).size < 2:
    return float("nan")
  return pearson(average_ranks(x), average_ranks(y))


def _tied_pairs(values: np.ndarray) -> int:
  """Number of pairs with equal values."""
  _, counts = np.unique(values, return_counts=True)
  return int(np.sum(counts * (counts - 1) // 2))


def _count_inversions(ranks: np.ndarray) -> int:
  """Pairs i < j with ranks[i] > ranks[j] (strictly), by a Fenwick tree, O(n log n)."""
  size = int(ranks.max()) + 1 if ranks.size else 1
  tree = np.zeros(size + 1, np.int64)
  inversions = 0
  for seen, r in enumerate(ranks.tolist()):
    # Elements seen so far with rank <= r.
    i, not_greater = r + 1, 0
    while i > 0:
      not_greater += tree[i]
      i -= i & -i
    inversions += seen - not_greater
    i = r + 1
    while i <= size:
      tree[i] += 1
      i += i & -i
  return int(inversions)


def kendall_tau_b(x: np.ndarray, y: np.ndarray) -> float:
  """Kendall τ-b of x, y [n] (Knight's O(n log n) algorithm); NaN if either is constant.

  With n0 = n(n-1)/2 pairs, n1 / n2 pairs tied in x / y, n3 tied in both and d
  discordant pairs: concordant − discordant = n0 − n1 − n2 + n3 − 2d and
  τ-b = (concordant − discordant) / sqrt((n0 − n1)(n0 − n2)).
  """
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  n = x.size
  if n < 2:
    return float("nan")
  n0 = n * (n - 1) // 2
  n1 = _tied_pairs(x)
  n2 = _tied_pairs(y)
  if n1 == n0 or n2 == n0:
    return float("nan")
  _, x_codes = np.unique(x, return_inverse=True)
  _, y_codes = np.unique(y, return_inverse=True)
  n3 = _tied_pairs(x_codes.astype(np.int64) * (int(y_codes.max()) + 1) + y_codes)
  # Sorted by x then y, pairs tied in x are never inversions in y.
  order = np.lexsort((y_codes, x_codes))
  discordant = _count_inversions(y_codes[order])
  numerator = n0 - n1 - n2 + n3 - 2 * discordant
  return float(np.clip(numerator / np.sqrt(float(n0 - n1) * float(n0 - n2)), -1, 1))


CORRELATIONS = {"pearson": pearson, "spearman": spearman, "kendall": kendall_tau_b}


def rmse(predictions: np.ndarray, labels: np.ndarray) -> float:
  """Root mean squared error, in label units."""
  diff = np.asarray(predictions, np.float64) - np.asarray(labels, np.float64)
  return float(np.sqrt(np.mean(diff * diff))) if diff.size else float("nan")


def per_group(metric, predictions: np.ndarray, labels: np.ndarray, groups: np.ndarray,
              *, min_group_size: int = 1) -> tuple[float, int, int]:
  """Unweighted mean over groups of metric(predictions[g], labels[g]).

  Returns:
    (nanmean over the groups used, number of groups used, number whose value was NaN).
    Groups with fewer than `min_group_size` items are not used.
  """
  groups = np.asarray(groups)
  values = []
  for group in np.unique(groups):
    member = groups == group
    if member.sum() < min_group_size:
      continue
    values.append(metric(predictions[member], labels[member]))
  values = np.asarray(values, np.float64)
  num_nan = int(np.isnan(values).sum())
  mean = float(np.nanmean(values)) if values.size > num_nan else float("nan")
  return mean, int(values.size), num_nan


# --- classification --------------------------------------------------------------------

def accuracy(predicted_class: np.ndarray, labels: np.ndarray) -> float:
  """Fraction of items whose predicted class equals the label."""
  labels = np.asarray(labels).astype(np.int64)
  if labels.size == 0:
    return float("nan")
  return float(np.mean(np.asarray(predicted_class).astype(np.int64) == labels))


def majority_accuracy(labels: np.ndarray) -> float:
  """Accuracy of the best constant prediction on these labels (majority baseline)."""
  labels = np.asarray(labels).astype(np.int64)
  if labels.size == 0:
    return float("nan")
  return float(np.bincount(labels).max() / labels.size)


# --- binary ranking (weighted) ---------------------------------------------------------

def _weighted_binary_curve(labels, scores, weights):
  """Cumulative weighted true/false positives at each distinct score, high to low.

  Returns:
    (fps [k], tps [k]): weight of negatives / positives with score >= the k-th distinct
    threshold (thresholds in decreasing order).
  """
  labels = np.asarray(labels, np.float64)
  scores = np.asarray(scores, np.float64)
  weights = (np.ones_like(scores) if weights is None
             else np.asarray(weights, np.float64))
  order = np.argsort(-scores, kind="mergesort")
  scores, labels, weights = scores[order], labels[order], weights[order]
  last_of_run = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
  tps = np.cumsum(labels * weights)[last_of_run]
  fps = np.cumsum((1.0 - labels) * weights)[last_of_run]
  return fps, tps


def _precision_recall(labels, scores, weights):
  """Precision and recall [k+1], recall increasing from the (0, precision 1) end point."""
  fps, tps = _weighted_binary_curve(labels, scores, weights)
  predicted = tps + fps
  precision = np.divide(tps, predicted, out=np.zeros_like(tps), where=predicted != 0)
  recall = tps / tps[-1]
  return np.r_[1.0, precision], np.r_[0.0, recall]


def _has_both_classes(labels, weights) -> bool:
  labels = np.asarray(labels, np.float64)
  w = np.ones_like(labels) if weights is None else np.asarray(weights, np.float64)
  return bool(np.sum(w * labels) > 0 and np.sum(w * (1 - labels)) > 0)


def auprc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None
          ) -> float:
  """ScanNet's AUCPR: trapezoidal area under the weighted precision-recall curve."""
  if not _has_both_classes(labels, weights):
    return float("nan")
  precision, recall = _precision_recall(labels, scores, weights)
  return float(np.trapezoid(precision, recall))


def average_precision(labels: np.ndarray, scores: np.ndarray,
                      weights: np.ndarray | None = None) -> float:
  """Step-wise average precision Σ (Rₙ − Rₙ₋₁) Pₙ (weighted)."""
  if not _has_both_classes(labels, weights):
    return float("nan")
  precision, recall = _precision_recall(labels, scores, weights)
  return float(np.sum(np.diff(recall) * precision[1:]))


def auroc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None
          ) -> float:
  """Trapezoidal area under the weighted ROC curve; ties count one half."""
  if not _has_both_classes(labels, weights):
    return float("nan")
  fps, tps = _weighted_binary_curve(labels, scores, weights)
  fpr = np.r_[0.0, fps / fps[-1]]
  tpr = np.r_[0.0, tps / tps[-1]]
  return float(np.trapezoid(tpr, fpr))


BINARY_METRICS = {"auprc": auprc, "average_precision": average_precision,
                  "auroc": auroc}


# --- dispatcher ------------------------------------------------------------------------

def compute_metrics(names: Sequence[str], *, predictions: np.ndarray,
                    labels: np.ndarray, weights: np.ndarray | None = None,
                    groups: np.ndarray | None = None,
                    min_group_size: int = 1) -> dict[str, float]:
  """Named metrics of one split.

  Args:
    names: metric names (see `ALL`).
    predictions: [n, C] class probabilities or scores (softmax tasks), [n] positive-class
      probability (binary tasks) or [n] predicted value in label units (regression).
    labels: [n] class index, 0/1, or value.
    weights: [n] per-item weights (binary metrics only; e.g. ScanNet chain weights).
    groups: [n] group key per item (MQA target, PPBS subset); needed by per-target and
      per-group metrics.
    min_group_size: per-target metrics skip smaller groups.

  Returns:
    name -> value, plus `<name>_groups` / `<name>_nan_groups` counts for per-target
    metrics and `<metric>/<group>` entries for per-group metrics.
  """
  predictions = np.asarray(predictions)
  labels = np.asarray(labels)
  out: dict[str, float] = {}
  out["num_items"] = float(labels.shape[0])
  for name in names:
    if name not in ALL:
      raise ValueError(f"unknown metric {name!r}; known: {', '.join(ALL)}")
    if name == "accuracy":
      predicted = predictions.argmax(-1) if predictions.ndim == 2 else predictions
      out[name] = accuracy(predicted, labels)
    elif name == "majority_accuracy":
      out[name] = majority_accuracy(labels)
    elif name in CORRELATION_GLOBAL:
      out[name] = CORRELATIONS[name.split("_")[0]](predictions, labels)
    elif name in CORRELATION_PER_TARGET:
      if groups is None:
        raise ValueError(f"metric {name!r} needs per-item groups (targets)")
      mean, used, nan = per_group(CORRELATIONS[name.split("_")[0]], predictions,
                                  labels, groups, min_group_size=min_group_size)
      out[name] = mean
      out[f"{name}_groups"] = float(used)
      out[f"{name}_nan_groups"] = float(nan)
    elif name == "rmse":
      out[name] = rmse(predictions, labels)
    elif name in CORRELATIONS:
      out[name] = CORRELATIONS[name](predictions, labels)
    elif name in BINARY_METRICS:
      out[name] = BINARY_METRICS[name](labels, predictions, weights)
    else:  # per-group binary metric
      if groups is None:
        raise ValueError(f"metric {name!r} needs per-item groups (subsets)")
      metric = name[:-len("_per_group")]
      for group in np.unique(groups):
        member = np.asarray(groups) == group
        out[f"{metric}/{group}"] = BINARY_METRICS[metric](
            labels[member], predictions[member],
            None if weights is None else np.asarray(weights)[member])
  return out
