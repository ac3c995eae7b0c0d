"""Task heads: pooling and losses against numpy/scipy closed forms. Budget: ≈ 5 s."""

import types

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import special

from bihier_jax.models import heads


def _task(loss, level, num_classes=1, mean=0.0, std=1.0):
  return ml_collections.ConfigDict(dict(loss=loss, level=level, num_classes=num_classes,
                                        label_mean=mean, label_std=std))


def _batch(rng, n=7, g=3):
  # Nodes 0-2 graph 0, 3-4 graph 1, 5-6 padding graph 2.
  return types.SimpleNamespace(
      node_mask=np.array([1, 1, 1, 1, 1, 0, 0], bool),
      node_label_mask=np.array([1, 0, 1, 1, 1, 0, 0], np.float32),
      node_weights=np.array([1.0, 1.0, 0.5, 2.0, 1.0, 1.0, 1.0], np.float32),
      node_labels=np.array([2, 1, 0, 1, 1, 0, 0], np.float32),
      graph_mask=np.array([1, 1, 0], bool),
      graph_weights=np.array([1.0, 3.0, 1.0], np.float32),
      graph_labels=np.array([6.5, 4.0, 0.0], np.float32),
      node_graph=np.array([0, 0, 0, 1, 1, 2, 2], np.int32))


def test_pool_sum_and_mean():
  b = _batch(None)
  x = np.arange(14, dtype=np.float32).reshape(7, 2)
  summed = heads.pool(jnp.asarray(x), b.node_graph, b.node_mask, 3, "sum")
  np.testing.assert_allclose(summed, [x[:3].sum(0), x[3:5].sum(0), [0, 0]])
  mean = heads.pool(jnp.asarray(x), b.node_graph, b.node_mask, 3, "mean")
  np.testing.assert_allclose(mean, [x[:3].mean(0), x[3:5].mean(0), [0, 0]])
  with pytest.raises(ValueError, match="pooling"):
    heads.pool(jnp.asarray(x), b.node_graph, b.node_mask, 3, "max")


def test_softmax_ce_weighted_and_masked():
  rng = np.random.default_rng(0)
  b = _batch(rng)
  logits = rng.normal(size=(7, 3)).astype(np.float32)
  logits[5:] = np.nan  # padding rows may hold anything
  value, aux = heads.loss(_task("softmax_ce", "node", 3), jnp.asarray(logits), b)
  labels = b.node_labels.astype(int)
  nll = -special.log_softmax(logits, axis=-1)[np.arange(7), labels]
  w = b.node_label_mask * b.node_weights * b.node_mask
  want = np.nansum(np.where(w > 0, nll * w, 0)) / w.sum()
  np.testing.assert_allclose(value, want, rtol=1e-5)
  correct = (np.argmax(np.nan_to_num(logits), -1) == labels).astype(float)
  np.testing.assert_allclose(aux["accuracy"], (correct * w).sum() / w.sum(), rtol=1e-6)
  probs = heads.predictions(_task("softmax_ce", "node", 3), jnp.asarray(logits[:5]))
  np.testing.assert_allclose(probs, special.softmax(logits[:5], -1), rtol=1e-5)


def test_sigmoid_bce_node_weights():
  rng = np.random.default_rng(1)
  b = _batch(rng)
  b.node_labels = np.array([1, 0, 0, 1, 1, 0, 0], np.float32)
  logits = rng.normal(size=(7, 1)).astype(np.float32)
  value, _ = heads.loss(_task("sigmoid_bce", "node"), jnp.asarray(logits), b)
  z, y = logits[:, 0].astype(np.float64), b.node_labels
  bce = -(y * np.log(special.expit(z)) + (1 - y) * np.log(special.expit(-z)))
  w = b.node_label_mask * b.node_weights * b.node_mask
  np.testing.assert_allclose(value, (bce * w).sum() / w.sum(), rtol=1e-5)
  np.testing.assert_allclose(heads.predictions(_task("sigmoid_bce", "node"), logits),
                             special.expit(z), rtol=1e-5)


def test_mse_standardised_graph_level():
  b = _batch(None)
  task = _task("mse", "graph", mean=5.0, std=2.0)
  logits = np.array([[0.5], [-1.0], [9.0]], np.float32)
  value, _ = heads.loss(task, jnp.asarray(logits), b)
  z = (b.graph_labels - 5.0) / 2.0  # [0.75, -0.5, .]
  want = (1.0 * (0.5 - z[0]) ** 2 + 3.0 * (-1.0 - z[1]) ** 2) / 4.0
  np.testing.assert_allclose(value, want, rtol=1e-6)
  np.testing.assert_allclose(heads.predictions(task, logits), logits[:, 0] * 2 + 5)


def test_bad_task_is_rejected():
  with pytest.raises(ValueError, match="num_classes"):
    heads.predictions(_task("mse", "graph", num_classes=3), jnp.zeros((2, 3)))
  with pytest.raises(ValueError, match="task.loss"):
    heads.predictions(_task("hinge", "graph"), jnp.zeros((2, 1)))
