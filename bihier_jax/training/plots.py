"""Training curves as a PNG (matplotlib, Agg backend: no display needed).

Reads the run's `metrics.jsonl` (one JSON object per write: {"step": s, name: value})
written by `JsonlWriter` during training.
"""

from __future__ import annotations

import collections
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position


def read_metrics(path: str) -> dict[str, list[tuple[int, float]]]:
  """name -> [(step, value)] from a metrics.jsonl; a later duplicate step wins."""
  series: dict[str, dict[int, float]] = collections.defaultdict(dict)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError:  # a line cut by a kill mid-write
        continue
      step = int(row.pop("step"))
      for name, value in row.items():
        if isinstance(value, (int, float)):
          series[name][step] = float(value)
  return {k: sorted(v.items()) for k, v in series.items()}


def plot_training_curves(metrics_path: str, out_path: str, *,
                         train_keys=("train/loss",), eval_metric: str = "accuracy"
                         ) -> str:
  """Two panels: training loss (and eval losses) vs step; eval `eval_metric` per split.

  Returns:
    out_path.
  """
  series = read_metrics(metrics_path)
  fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
  for key in train_keys:
    if key in series:
      steps, values = zip(*series[key])
      ax_loss.plot(steps, values, label=key, lw=1)
  for key in sorted(series):
    if key.endswith("/loss") and key not in train_keys:
      steps, values = zip(*series[key])
      ax_loss.plot(steps, values, "o-", label=key, ms=3)
    if key.endswith("/" + eval_metric) and not key.startswith("train/"):
      steps, values = zip(*series[key])
      ax_metric.plot(steps, values, "o-", label=key, ms=3)
    if key.endswith("/majority_accuracy") and eval_metric == "accuracy":
      steps, values = zip(*series[key])
      ax_metric.plot(steps, values, ":", label=key + " (baseline)")
  ax_loss.set_xlabel("step")
  ax_loss.set_ylabel("loss")
  ax_loss.set_title("loss")
  ax_metric.set_xlabel("step")
  ax_metric.set_ylabel(eval_metric)
  ax_metric.set_title(f"held-out {eval_metric}")
  for ax in (ax_loss, ax_metric):
    if ax.lines:
      ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(out_path, dpi=100)
  plt.close(fig)
  return out_path
