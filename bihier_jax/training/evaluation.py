"""Evaluation: run the eval step over a split, collect per-item arrays, score them.

`collect_predictions` runs a jitted `steps.eval_step` over a finite stream and returns
the scored items of the whole split (gathered over hosts); `split_metrics` scores them
with `task.metrics`; `evaluate_splits` does both for several splits;
`write_eval_results` writes DIR/eval/<split>.json and DIR/eval/metrics.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
import json
import os

import jax
import ml_collections
import numpy as np

from bihier_jax.data import epochs
from bihier_jax.data.batch import Batch
from bihier_jax.training import metrics as metrics_lib
from bihier_jax.training import parallel


def data_dir(config: ml_collections.ConfigDict) -> str:
  """config.data.dir made absolute (a gs:// or other URL as it is)."""
  from bihier_jax.common import storage  # pylint: disable=g-import-not-at-top
  return storage.absolute(config.data.dir)


# One rule for the input pipeline, the epoch estimate and the training loop.
accumulation_steps = epochs.accumulation_steps
per_device_config = epochs.sub_batch_config


def local_rows(x: jax.Array) -> np.ndarray:
  """This host's rows of a global array sharded on axis 0, in global order."""
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  seen, rows = set(), []
  for s in shards:
    start = s.index[0].start or 0
    if start in seen:  # replicas of the same rows
      continue
    seen.add(start)
    rows.append(np.asarray(s.data))
  return np.concatenate(rows, axis=0)


def _gather_hosts(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Concatenates each host's variable-length arrays on every host (process order)."""
  if jax.process_count() == 1:
    return arrays
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  n = next(iter(arrays.values())).shape[0]
  counts = multihost_utils.process_allgather(np.array([n]))
  longest = int(counts.max())
  out = {}
  for name, a in arrays.items():
    padded = np.zeros((longest,) + a.shape[1:], a.dtype)
    padded[:n] = a
    full = multihost_utils.process_allgather(padded)
    out[name] = np.concatenate([full[i, :int(counts[i])] for i in range(len(counts))])
  return out


def _gather_strings(values: np.ndarray) -> np.ndarray:
  if jax.process_count() == 1:
    return values
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  encoded = np.frombuffer(json.dumps(values.tolist()).encode(), np.uint8)
  n = multihost_utils.process_allgather(np.array([encoded.size]))
  padded = np.zeros([int(n.max())], np.uint8)
  padded[:encoded.size] = encoded
  full = multihost_utils.process_allgather(padded)
  parts = [json.loads(bytes(full[i, :int(n[i])]).decode()) for i in range(len(n))]
  return np.array([v for p in parts for v in p])


def collect_predictions(eval_fn, params, stream: Iterable[tuple[Batch, dict]], mesh,
                        task, *, with_embeddings: bool = False) -> dict[str, np.ndarray]:
  """Runs `eval_fn` over a finite stream; per-item arrays of the whole split.

  Items are residues with a label (task.level 'node') or real proteins ('graph').

  Returns:
    predictions [n, ...], labels [n], weights [n], groups [n] (str), ids [n] (str;
    the protein of each item), loss_sum, weight_sum (floats), and embeddings [n, D]
    if with_embeddings.
  """
  num_local = parallel.local_device_count(mesh)
  cols: dict[str, list] = {k: [] for k in ("predictions", "labels", "weights",
                                           "groups", "ids", "embeddings")}
  loss_sum = weight_sum = 0.0
  for stacked, metas in parallel.iterate_finite(stream, num_local):
    out = eval_fn(params, parallel.put_global(stacked, mesh))
    out = {k: local_rows(v) for k, v in out.items()}
    for d, meta in enumerate(metas):
      if meta is None:
        continue
      sub = parallel.tree_unstack(stacked, d)
      loss_sum += float(out["loss"][d]) * float(out["weight_sum"][d])
      weight_sum += float(out["weight_sum"][d])
      num_real = int(np.sum(sub.graph_mask))
      ids = np.asarray(list(meta.get("ids", [""] * num_real))[:num_real] or [""], str)
      groups = np.asarray(list(meta.get("groups", [""] * num_real))[:num_real]
                          or [""], str)
      if task.level == "node":
        mask = (sub.node_label_mask > 0) & sub.node_mask
        graph_of = np.minimum(sub.node_graph[mask], max(num_real - 1, 0))
        cols["labels"].append(sub.node_labels[mask])
        cols["weights"].append(sub.node_weights[mask])
        embed_key = "node_embeddings"
      else:
        mask = sub.graph_mask.astype(bool)
        graph_of = np.arange(int(mask.sum()))
        cols["labels"].append(sub.graph_labels[mask])
        cols["weights"].append(sub.graph_weights[mask])
        embed_key = "graph_embeddings"
      cols["predictions"].append(out["predictions"][d][mask])
      cols["groups"].append(groups[graph_of])
      cols["ids"].append(ids[graph_of])
      if with_embeddings:
        cols["embeddings"].append(out[embed_key][d][mask])
  result = {k: np.concatenate(v) for k, v in cols.items() if v}
  if "predictions" not in result:
    raise ValueError("the evaluation split has no labelled items")
  numeric = _gather_hosts({k: v for k, v in result.items()
                           if k not in ("groups", "ids")})
  numeric["groups"] = _gather_strings(result["groups"])
  numeric["ids"] = _gather_strings(result["ids"])
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    loss_sum, weight_sum = multihost_utils.process_allgather(
        np.array([loss_sum, weight_sum])).sum(0)
  numeric["loss"] = np.float64(loss_sum / max(weight_sum, 1e-12))
  return numeric


def split_metrics(config, collected: dict[str, np.ndarray]) -> dict[str, float]:
  """task.metrics of one split, plus its loss."""
  values = metrics_lib.compute_metrics(
      config.task.metrics, predictions=collected["predictions"],
      labels=collected["labels"], weights=collected["weights"],
      groups=collected["groups"],
      min_group_size=int(config.task.min_group_size))
  values["loss"] = float(collected["loss"])
  return values


def eval_stream(config, dataset_fn, split: str, sub_config):
  return dataset_fn(data_dir(config), split, sub_config, training=False,
                    seed=config.seed, process_index=jax.process_index(),
                    process_count=jax.process_count())


def evaluate_splits(config, dataset_fn, eval_fn, params, mesh, splits: Sequence[str]
                    ) -> dict[str, dict[str, float]]:
  """Metrics per split; `mesh` is this host's eval mesh (`parallel.local_mesh`), and
  `eval_fn` was jitted for it; results of all hosts are gathered before metrics."""
  sub_config = per_device_config(config, jax.device_count())
  params = parallel.localize(params, mesh)
  results = {}
  for split in splits:
    collected = collect_predictions(eval_fn, params,
                                    eval_stream(config, dataset_fn, split, sub_config),
                                    mesh, config.task)
    results[split] = split_metrics(config, collected)
  return results


def markdown_table(results: dict[str, dict[str, float]]) -> str:
  """Splits as columns, metrics as rows."""
  splits = list(results)
  names = []
  for split in splits:
    names += [n for n in results[split] if n not in names]
  lines = ["| metric | " + " | ".join(splits) + " |",
           "|---" * (len(splits) + 1) + "|"]
  for name in names:
    cells = []
    for split in splits:
      v = results[split].get(name)
      cells.append("" if v is None else (f"{v:.0f}" if name.startswith("num_")
                                         or name.endswith("groups") else f"{v:.4f}"))
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def write_eval_results(workdir: str, results: dict[str, dict[str, float]], *,
                       step: int, checkpoint: str, note: str = "") -> str:
  """DIR/eval/<split>.json per split and DIR/eval/metrics.md; returns the table.

  Args:
    step: the training step of the evaluated parameters.
    checkpoint: which checkpoint they are: 'best' (selected on validation), 'latest',
      or the step number asked for; stored in every JSON beside `step`.
    note: a line under the metrics.md heading (how the checkpoint was chosen).
  """
  out_dir = os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  for split, values in results.items():
    with open(os.path.join(out_dir, f"{split}.json"), "w") as f:
      json.dump({k: (None if not np.isfinite(v) else float(v)) for k, v in
                 values.items()} | {"step": step, "checkpoint": checkpoint}, f,
                indent=1, sort_keys=True)
  table = markdown_table(results)
  with open(os.path.join(out_dir, "metrics.md"), "w") as f:
    f.write(f"Checkpoint {checkpoint} (step {step})\n\n" + (f"{note}\n\n" if note else "")
            + table)
  return table
