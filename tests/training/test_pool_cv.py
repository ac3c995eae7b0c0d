"""Predictions files and pooled cross-validation metrics (ScanNet BCE protocol).

- a predictions file written from collected eval items gives back, offline, exactly the
  metrics of the eval JSON (node, multi-class and graph-level items);
- pooling 5 synthetic folds equals sklearn's trapezoidal weighted AUPRC and weighted
  AUROC on the concatenation; per-fold mean ± std equal sklearn per file;
- an example in two files is an error naming it; the CLI writes the JSON.

Budget: < 20 s on an idle 2-core machine (no model, no JAX compile).
"""

import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from sklearn import metrics as skm

from bihier_jax.training import pooling
from bihier_jax.training import evaluation
from tests.paths import REPO


def _task(level, metrics, loss="sigmoid_bce", name="bce"):
  return ml_collections.ConfigDict(dict(name=name, level=level, loss=loss,
                                        metrics=tuple(metrics), min_group_size=1))


def _fold(rng, fold, num_examples=6, *, first=0):
  """Collected items of `num_examples` examples with 20-60 residues each."""
  ids, groups, labels, preds, weights, rows, pos = [], [], [], [], [], [], []
  for e in range(first, first + num_examples):
    n = int(rng.integers(20, 60))
    w = float(rng.uniform(0.01, 1.0))
    y = (rng.random(n) < 0.2).astype(np.float32)
    ids += [f"f{fold}_ex{e}"] * n
    groups += [f"fold{fold}"] * n
    labels.append(y)
    # Scores correlated with labels, rounded so that ties occur.
    preds.append(np.round(np.clip(0.3 * y + rng.random(n) * 0.7, 0, 1), 2))
    weights.append(np.full(n, w, np.float32))
    rows.append(np.zeros(n, np.int32))
    pos.append(np.arange(n, dtype=np.int32))
  collected = {"ids": np.array(ids), "groups": np.array(groups),
               "labels": np.concatenate(labels),
               "predictions": np.concatenate(preds).astype(np.float32),
               "weights": np.concatenate(weights), "loss": np.float64(0.5)}
  return collected, np.concatenate(rows), np.concatenate(pos)


def _sk_auprc(y, p, w):
  precision, recall, _ = skm.precision_recall_curve(y, p, sample_weight=w)
  return skm.auc(recall, precision)


def _write_folds(tmp_path, rng, num_folds=5):
  task = _task("node", ("auprc", "auroc"))
  paths, data = [], []
  for k in range(1, num_folds + 1):
    collected, rows, pos = _fold(rng, k)
    path = str(tmp_path / f"run{k}" / "eval" / "test_predictions.npz")
    pooling.save_predictions(path, collected, task=task, split="test", step=10,
                             chain_row=rows, residue_index=pos)
    paths.append(path)
    data.append(collected)
  return paths, data


@pytest.mark.parametrize("level,loss,metrics", [
    ("node", "sigmoid_bce", ("auprc", "auroc", "average_precision",
                             "auprc_per_group")),
    ("node", "softmax_ce", ("accuracy", "majority_accuracy")),
    ("graph", "mse", ("rmse", "pearson_global", "spearman_per_target")),
])
def test_recomputed_metrics_equal_eval_json(tmp_path, level, loss, metrics):
  rng = np.random.default_rng(0)
  collected, rows, pos = _fold(rng, 1, num_examples=8)
  collected["groups"] = np.array([i[-1] for i in collected["ids"]])  # several groups
  if loss == "softmax_ce":
    logits = rng.normal(size=(collected["labels"].size, 3))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    collected["predictions"] = probs.astype(np.float32)
    collected["labels"] = rng.integers(0, 3, collected["labels"].size).astype(np.float32)
  elif loss == "mse":
    collected["predictions"] = rng.normal(size=collected["labels"].size).astype(
        np.float32)
    collected["labels"] = rng.normal(size=collected["labels"].size).astype(np.float32)
  if level == "graph":
    rows = pos = None
  task = _task(level, metrics, loss)
  config = ml_collections.ConfigDict({"task": task})
  results = {"test": evaluation.split_metrics(config, collected)}
  evaluation.write_eval_results(str(tmp_path), results, step=7, checkpoint="best")
  path = pooling.save_predictions(str(tmp_path / "eval" / "test_predictions.npz"),
                                  collected, task=task, split="test", step=7,
                                  chain_row=rows, residue_index=pos)
  saved = json.load(open(tmp_path / "eval" / "test.json"))
  preds = pooling.load_predictions(path)
  assert preds["prediction"].dtype == np.float32
  assert str(preds["task_level"]) == level and int(preds["checkpoint_step"]) == 7
  if level == "node":
    np.testing.assert_array_equal(preds["residue_index"], pos)
  else:
    assert np.all(preds["residue_index"] == -1)
  again = pooling.recompute_metrics(preds)
  # Not metrics of the predictions: how long chains were read.
  names = set(saved) - {"loss", "step", "checkpoint", "num_windowed_proteins"}
  assert names == set(again) and len(names) > 2
  for name in names:
    if saved[name] is None:
      assert np.isnan(again[name]), name
    else:
      assert again[name] == saved[name], name  # float32 in, same float64 out


def test_pooled_metrics_match_sklearn(tmp_path):
  rng = np.random.default_rng(1)
  paths, data = _write_folds(tmp_path, rng)
  result = pooling.pool_folds(paths, ("auprc", "auroc", "average_precision"))
  y = np.concatenate([d["labels"] for d in data])
  p = np.concatenate([d["predictions"] for d in data])
  w = np.concatenate([d["weights"] for d in data])
  pooled = result["pooled"]
  assert pooled["auprc"] == pytest.approx(_sk_auprc(y, p, w), abs=1e-12)
  assert pooled["auroc"] == pytest.approx(skm.roc_auc_score(y, p, sample_weight=w),
                                          abs=1e-12)
  assert pooled["average_precision"] == pytest.approx(
      skm.average_precision_score(y, p, sample_weight=w), abs=1e-12)
  assert pooled["num_items"] == y.size and pooled["num_examples"] == 30
  per_fold = [_sk_auprc(d["labels"], d["predictions"], d["weights"]) for d in data]
  for path, value in zip(paths, per_fold):
    assert result["per_fold"][path]["auprc"] == pytest.approx(value, abs=1e-12)
  assert result["per_fold_mean"]["auprc"] == pytest.approx(np.mean(per_fold))
  assert result["per_fold_std"]["auprc"] == pytest.approx(np.std(per_fold, ddof=1))
  assert result["per_fold_count"]["auprc"] == 5
  # Pooling is not the mean of the folds (weights and score scales differ per fold).
  assert pooled["auprc"] != pytest.approx(np.mean(per_fold), abs=1e-6)


def test_duplicate_example_is_an_error(tmp_path):
  rng = np.random.default_rng(2)
  paths, _ = _write_folds(tmp_path, rng, num_folds=2)
  collected, rows, pos = _fold(rng, 9, num_examples=2)
  collected["ids"] = np.where(collected["ids"] == "f9_ex1", "f2_ex3", collected["ids"])
  dup = pooling.save_predictions(str(tmp_path / "dup.npz"), collected,
                                 task=_task("node", ("auprc",)), split="test", step=1,
                                 chain_row=rows, residue_index=pos)
  with pytest.raises(ValueError, match=r"'f2_ex3' is in both .*run2.* and .*dup\.npz"):
    pooling.pool_folds(paths + [dup])
  with pytest.raises(ValueError, match="f1_ex0"):  # the same file twice
    pooling.pool_folds([paths[0], paths[0]])


def test_multiclass_predictions_are_refused(tmp_path):
  rng = np.random.default_rng(3)
  collected, rows, pos = _fold(rng, 1, num_examples=2)
  collected["predictions"] = np.stack([1 - collected["predictions"],
                                       collected["predictions"]], 1)
  path = pooling.save_predictions(str(tmp_path / "mc.npz"), collected,
                                  task=_task("node", ("accuracy",), "softmax_ce"),
                                  split="test", step=1, chain_row=rows,
                                  residue_index=pos)
  with pytest.raises(ValueError, match="mc.npz.*one probability per item"):
    pooling.pool_folds([path])


def test_cli_writes_pooled_json(tmp_path):
  rng = np.random.default_rng(4)
  paths, data = _write_folds(tmp_path, rng, num_folds=3)
  out = str(tmp_path / "pooled.json")
  proc = subprocess.run(
      [sys.executable, "-m", "bihier_jax.pool_cv", "--predictions", ",".join(paths[:2]),
       paths[2], "--out", out], cwd=REPO, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.load(open(out))
  y = np.concatenate([d["labels"] for d in data])
  p = np.concatenate([d["predictions"] for d in data])
  w = np.concatenate([d["weights"] for d in data])
  assert result["pooled"]["auprc"] == pytest.approx(_sk_auprc(y, p, w), abs=1e-12)
  assert result["num_folds"] == 3 and "auprc: pooled" in proc.stdout
  proc = subprocess.run(
      [sys.executable, "-m", "bihier_jax.pool_cv", "--predictions",
       f"{paths[0]},{paths[0]}", "--out", out], cwd=REPO, capture_output=True,
      text=True, timeout=120, env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 2 and "f1_ex0" in proc.stderr
