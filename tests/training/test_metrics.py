"""Metrics against scipy / sklearn: ties, constant predictions, one-element groups.

Budget: < 5 s.
"""

import warnings

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from bihier_jax.training import metrics


def _pairs(seed, n=200, ties=False):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=n)
  y = 0.5 * x + rng.normal(size=n)
  if ties:  # few distinct values: many ties in both variables
    x = np.round(x * 2) / 2
    y = np.round(y)
  return x, y


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_correlations_match_scipy(seed, ties):
  x, y = _pairs(seed, ties=ties)
  np.testing.assert_allclose(metrics.pearson(x, y), stats.pearsonr(x, y)[0], atol=1e-12)
  np.testing.assert_allclose(metrics.spearman(x, y), stats.spearmanr(x, y)[0],
                             atol=1e-12)
  np.testing.assert_allclose(metrics.kendall_tau_b(x, y), stats.kendalltau(x, y)[0],
                             atol=1e-12)
  np.testing.assert_array_equal(metrics.average_ranks(x), stats.rankdata(x))


def test_kendall_small_exhaustive_ties():
  rng = np.random.default_rng(3)
  for _ in range(50):
    n = int(rng.integers(3, 9))
    x = rng.integers(0, 3, n).astype(float)
    y = rng.integers(0, 3, n).astype(float)
    expected = stats.kendalltau(x, y)[0] if len(set(x)) > 1 and len(set(y)) > 1 \
        else np.nan
    np.testing.assert_allclose(metrics.kendall_tau_b(x, y), expected, atol=1e-12)


def test_constant_predictions_give_nan():
  x = np.full(10, 0.3)
  y = np.arange(10.0)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for fn, ref in [(metrics.pearson, stats.pearsonr), (metrics.spearman, stats.spearmanr),
                    (metrics.kendall_tau_b, stats.kendalltau)]:
      assert np.isnan(fn(x, y))
      assert np.isnan(ref(x, y)[0])


def test_per_target_mean_skips_small_and_counts_nan():
  rng = np.random.default_rng(0)
  groups = np.array(["a"] * 6 + ["b"] * 5 + ["c"] * 1 + ["d"] * 4)
  y = rng.normal(size=groups.size)
  p = y + rng.normal(size=groups.size)
  p[groups == "d"] = 1.0  # constant predictions in one target -> NaN there
  expected = np.mean([stats.spearmanr(p[groups == g], y[groups == g])[0]
                      for g in ("a", "b")])
  out = metrics.compute_metrics(["spearman_per_target"], predictions=p, labels=y,
                                groups=groups, min_group_size=3)
  np.testing.assert_allclose(out["spearman_per_target"], expected, atol=1e-12)
  assert out["spearman_per_target_groups"] == 3  # a, b, d (c has one element)
  assert out["spearman_per_target_nan_groups"] == 1
  # With min size 1 the one-element group is used and is NaN too.
  out = metrics.compute_metrics(["kendall_per_target"], predictions=p, labels=y,
                                groups=groups, min_group_size=1)
  assert out["kendall_per_target_groups"] == 4
  assert out["kendall_per_target_nan_groups"] == 2


def test_regression_metrics():
  x, y = _pairs(5)
  out = metrics.compute_metrics(["rmse", "pearson", "spearman"], predictions=x,
                                labels=y)
  np.testing.assert_allclose(out["rmse"], np.sqrt(skm.mean_squared_error(y, x)))
  np.testing.assert_allclose(out["pearson"], stats.pearsonr(x, y)[0])
  np.testing.assert_allclose(out["spearman"], stats.spearmanr(x, y)[0])


def test_accuracy_and_majority():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, 100)
  probs = rng.dirichlet(np.ones(3), 100)
  out = metrics.compute_metrics(["accuracy", "majority_accuracy"], predictions=probs,
                                labels=labels)
  np.testing.assert_allclose(out["accuracy"],
                             skm.accuracy_score(labels, probs.argmax(-1)))
  np.testing.assert_allclose(out["majority_accuracy"],
                             skm.accuracy_score(labels, np.full(100, np.bincount(
                                 labels).argmax())))


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_binary_metrics_match_sklearn(ties, weighted):
  rng = np.random.default_rng(7)
  n = 300
  labels = (rng.random(n) < 0.3).astype(float)
  scores = labels * 0.5 + rng.random(n)
  if ties:
    scores = np.round(scores, 1)
  weights = rng.uniform(0.01, 1.0, n) if weighted else None
  precision, recall, _ = skm.precision_recall_curve(labels, scores,
                                                    sample_weight=weights)
  np.testing.assert_allclose(metrics.auprc(labels, scores, weights),
                             skm.auc(recall, precision), atol=1e-12)
  np.testing.assert_allclose(
      metrics.average_precision(labels, scores, weights),
      skm.average_precision_score(labels, scores, sample_weight=weights), atol=1e-12)
  np.testing.assert_allclose(metrics.auroc(labels, scores, weights),
                             skm.roc_auc_score(labels, scores, sample_weight=weights),
                             atol=1e-12)


def test_binary_constant_scores_and_one_class():
  labels = np.array([0, 1, 0, 1, 1.0])
  scores = np.full(5, 0.2)
  precision, recall, _ = skm.precision_recall_curve(labels, scores)
  np.testing.assert_allclose(metrics.auprc(labels, scores), skm.auc(recall, precision))
  np.testing.assert_allclose(metrics.auroc(labels, scores),
                             skm.roc_auc_score(labels, scores))
  assert np.isnan(metrics.auprc(np.zeros(4), np.arange(4.0)))
  assert np.isnan(metrics.auroc(np.ones(4), np.arange(4.0)))


def test_per_group_binary_and_unknown_name():
  rng = np.random.default_rng(1)
  labels = (rng.random(60) < 0.4).astype(float)
  scores = rng.random(60) + 0.3 * labels
  groups = np.array(["70", "homology", "none"] * 20)
  out = metrics.compute_metrics(["auprc", "auprc_per_group"], predictions=scores,
                                labels=labels, groups=groups)
  for g in ("70", "homology", "none"):
    m = groups == g
    p, r, _ = skm.precision_recall_curve(labels[m], scores[m])
    np.testing.assert_allclose(out[f"auprc/{g}"], skm.auc(r, p), atol=1e-12)
  with pytest.raises(ValueError, match="unknown metric"):
    metrics.compute_metrics(["acc"], predictions=scores, labels=labels)
