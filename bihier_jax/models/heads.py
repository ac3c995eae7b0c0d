"""Task heads: `pool` (sum / mean per graph in float32, `POOLINGS`), `MLPHead`, the
masked and weighted losses (`loss`, `LOSSES`: softmax_ce, sigmoid_bce, mse; normalised
by the total weight in the batch, loss = Σ wᵢ·ℓᵢ / max(Σ wᵢ, 1e-6)) and predictions
(`predictions`, `prediction_kind`, `class_names`). Weights: ScanNet chain weights for
PPBS/BCE via `node_weights`, example weights via `graph_weights`; mse targets are
standardised with task.label_mean / task.label_std (loss in units of label_std²).
Shapes: N nodes, G graphs, C classes (task.num_classes).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

Dtype = Any

LOSSES = ("softmax_ce", "sigmoid_bce", "mse")
LEVELS = ("node", "graph")
POOLINGS = ("sum", "mean")  # model.head.pooling


def pool(node_features, node_graph, node_mask, num_graphs: int, kind: str = "mean"):
  """Sum or mean of each graph's real node features, accumulated in float32.

  In bfloat16 a running sum stops growing once its spacing exceeds the terms (256 + 1
  rounds to 256), so features and counts are summed in float32 (counts as int32)
  whatever the compute dtype.

  Args:
    node_features: [N, D] any float dtype.
    node_graph: int32[N] graph index of each node.
    node_mask: bool[N] real node.
    num_graphs: G (static).
    kind: "sum" | "mean".

  Returns:
    float32[G, D]; zero for graphs without real nodes (the padding graph).
  """
  masked = jnp.where(node_mask[:, None], node_features.astype(jnp.float32), 0.0)
  total = jax.ops.segment_sum(masked, node_graph, num_segments=num_graphs)
  if kind == "sum":
    return total
  if kind == "mean":
    count = jax.ops.segment_sum(node_mask.astype(jnp.int32), node_graph,
                                num_segments=num_graphs)
    return total / jnp.maximum(count, 1).astype(jnp.float32)[:, None]
  raise ValueError(f"model.head.pooling must be one of {POOLINGS}, got {kind!r}")


class MLPHead(nn.Module):
  """Dense -> GELU -> dropout -> Dense(num_outputs); outputs float32.

  Attributes:
    hidden: hidden width.
    num_outputs: C.
    dropout: dropout rate before the output layer.
    dtype: compute dtype.
  """
  hidden: int
  num_outputs: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features, deterministic: bool):
    """[M, D] -> float32[M, C]."""
    y = nn.Dense(self.hidden, dtype=self.dtype, name="hidden")(features)
    y = nn.Dropout(self.dropout)(nn.gelu(y), deterministic=deterministic)
    y = nn.Dense(self.num_outputs, dtype=self.dtype, name="out")(y)
    return y.astype(jnp.float32)


def _check_task(task):
  if task.loss not in LOSSES:
    raise ValueError(f"task.loss must be one of {LOSSES}, got {task.loss!r}")
  if task.level not in LEVELS:
    raise ValueError(f"task.level must be one of {LEVELS}, got {task.level!r}")
  if task.loss != "softmax_ce" and task.num_classes != 1:
    raise ValueError(f"task.loss={task.loss!r} needs task.num_classes=1, "
                     f"got {task.num_classes}")


def targets_and_weights(task, batch):
  """Labels and loss weights at the task's level.

  Returns:
    (labels float32[M], weights float32[M]) with M = N (node) or G (graph); weights are
    zero on padding and unlabelled items.
  """
  if task.level == "node":
    weights = (batch.node_label_mask.astype(jnp.float32)
               * batch.node_mask.astype(jnp.float32)
               * batch.node_weights.astype(jnp.float32))
    return batch.node_labels.astype(jnp.float32), weights
  weights = batch.graph_weights.astype(jnp.float32) * batch.graph_mask.astype(jnp.float32)
  return batch.graph_labels.astype(jnp.float32), weights


def per_item_loss(task, logits, labels):
  """Unweighted loss of each item. logits float[M, C], labels float[M] -> float32[M]."""
  _check_task(task)
  logits = logits.astype(jnp.float32)
  if task.loss == "softmax_ce":
    classes = jnp.clip(labels.astype(jnp.int32), 0, task.num_classes - 1)
    return optax.softmax_cross_entropy_with_integer_labels(logits, classes)
  if task.loss == "sigmoid_bce":
    return optax.sigmoid_binary_cross_entropy(logits[:, 0], labels)
  standardised = (labels - task.label_mean) / task.label_std
  return jnp.square(logits[:, 0] - standardised)


def loss(task, logits, batch):
  """Weighted mean loss of a batch.

  Args:
    task: `config.task` (loss, level, num_classes, label_mean, label_std).
    logits: float[M, C] model output at the task's level.
    batch: `bihier_jax.data.batch.Batch`.

  Returns:
    (scalar loss, aux) where aux has `per_item_loss` [M], `weights` [M],
    `weight_sum` [] and, for softmax_ce, `accuracy` [] (weighted).
  """
  labels, weights = targets_and_weights(task, batch)
  items = per_item_loss(task, logits, labels)
  weight_sum = weights.sum()
  total = jnp.sum(jnp.where(weights > 0, items * weights, 0))
  value = total / jnp.maximum(weight_sum, 1e-6)
  aux = {"per_item_loss": items, "weights": weights, "weight_sum": weight_sum}
  if task.loss == "softmax_ce":
    correct = (jnp.argmax(logits, -1) == labels.astype(jnp.int32)).astype(jnp.float32)
    aux["accuracy"] = jnp.sum(correct * weights) / jnp.maximum(weight_sum, 1e-6)
  return value, aux


def prediction_kind(task) -> str:
  """What `predictions` hold: class_probabilities | positive_probability | value."""
  return {"softmax_ce": "class_probabilities", "sigmoid_bce": "positive_probability",
          "mse": "value"}[task.loss]


def class_names(task) -> tuple[str, ...]:
  """Names of the prediction columns: task.class_names, else class_0.. (softmax_ce),
  the positive class (sigmoid_bce) or the label (mse) named after the task."""
  names = tuple(str(n) for n in (task.get("class_names", ()) or ()))
  if names:
    return names
  if task.loss == "softmax_ce":
    return tuple(f"class_{k}" for k in range(int(task.num_classes)))
  return (f"{task.name}_positive",) if task.loss == "sigmoid_bce" else (task.name,)


def predictions(task, logits):
  """What metrics consume: class probabilities float32[M, C] (softmax_ce), positive-class
  probabilities float32[M] (sigmoid_bce), or de-standardised values float32[M] (mse)."""
  _check_task(task)
  logits = logits.astype(jnp.float32)
  if task.loss == "softmax_ce":
    return jax.nn.softmax(logits, axis=-1)
  if task.loss == "sigmoid_bce":
    return jax.nn.sigmoid(logits[:, 0])
  return logits[:, 0] * task.label_std + task.label_mean
