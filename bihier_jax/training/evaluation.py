"""Evaluation: run the eval step over a split, collect per-item arrays, score them.

`collect_predictions` runs a jitted `steps.eval_step` over a finite stream and returns
the scored items of the whole split (gathered over hosts, in the global plan's batch
order, so the same for any host count); `split_metrics` scores them
with `task.metrics`; `evaluate_splits` does both for several splits;
`write_eval_results` writes DIR/eval/<split>.json and DIR/eval/metrics.md.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence
import json
import os

import jax
import numpy as np

from bihier_jax.common import storage
from bihier_jax.data import budgets as budgets_lib
from bihier_jax.data import epochs
from bihier_jax.data.batch import Batch
from bihier_jax.training import metrics as metrics_lib
from bihier_jax.training import device_batches
from bihier_jax.training import mesh as mesh_lib


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


def _allgather(x: np.ndarray) -> np.ndarray:
  """[H, ...]: `x` of every process (same shape on each), in process order."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x))


def gather_hosts(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Each array (same names and rows on every host, any row count, str allowed)
  concatenated over the hosts in process order, on every host. A host without rows
  may hold arrays of any trailing shape: another host's give it."""
  if jax.process_count() == 1:
    return arrays
  names = sorted(arrays)
  counts = _allgather(np.array([len(arrays[n]) for n in names], np.int64))  # [H, k]
  shape = {n: (a.dtype.str, a.shape[1:]) for n, a in arrays.items()}
  shapes = [dict(zip(names, (tuple(v) for v in s))) for s in _gather_json(
      [[shape[n][0], list(shape[n][1])] for n in names])]
  out = {}
  for k, name in enumerate(names):
    dtype, trailing = next((s[name] for h, s in enumerate(shapes) if counts[h, k]),
                           shapes[0][name])
    a = arrays[name]
    if np.dtype(dtype).kind in "US":  # strings go as JSON (widths differ by host)
      values = [v for part in _gather_json(a.tolist()) for v in part]
      out[name] = np.array(values, str) if values else np.zeros([0], str)
      continue
    rows = int(counts[:, k].max())
    if not rows:
      out[name] = np.zeros((0, *trailing), dtype)
      continue
    padded = np.zeros((rows, *trailing), dtype)
    padded[:len(a)] = a.reshape(-1, *trailing) if len(a) else padded[:0]
    # As bytes: JAX would narrow 64-bit values to 32 bits on the way.
    full = _allgather(padded.reshape(rows, -1).view(np.uint8))
    out[name] = np.concatenate([
        full[h, :int(counts[h, k])].view(dtype).reshape(-1, *trailing)
        for h in range(len(full))])
  return out


def _gather_json(value) -> list:
  """A JSON-able value from every process, in process order."""
  encoded = np.frombuffer(json.dumps(value).encode(), np.uint8)
  n = _allgather(np.array([encoded.size], np.int64)).reshape(-1)
  padded = np.zeros([int(n.max())], np.uint8)
  padded[:encoded.size] = encoded
  full = _allgather(padded)
  return [json.loads(bytes(full[h, :int(n[h])]).decode()) for h in range(len(n))]


def _residue_positions(sub: Batch, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(chain row in its protein, residue_index) int32 of the residues `mask` selects.

  chain_id = (index in the batch of the example's first chain) + chain_row, in both row
  layouts; chain row 0 always has residues, so an example's smallest residue chain_id
  is its first chain's.
  """
  nodes = sub.graph.nodes
  real = (nodes["node_kind"] == 0) & sub.node_mask.astype(bool)
  first_chain = np.full(int(sub.node_graph.max(initial=0)) + 1, np.iinfo(np.int32).max)
  np.minimum.at(first_chain, sub.node_graph[real], nodes["chain_id"][real])
  chain_row = nodes["chain_id"][mask] - first_chain[sub.node_graph[mask]]
  return chain_row.astype(np.int32), nodes["residue_index"][mask].astype(np.int32)


def collect_predictions(eval_fn, params, stream: Iterable[tuple[Batch, dict]], mesh,
                        task, *, with_embeddings: bool = False,
                        with_positions: bool = False) -> dict[str, np.ndarray]:
  """Runs `eval_fn` over a finite stream; per-item arrays of the whole split.

  Items are residues with a label (task.level 'node') or real proteins ('graph'). Every
  host runs its own batches; the items of all hosts are gathered and put in the order
  of the batches' place in the global plan (meta "index"), so the arrays, and the
  metrics computed from them, are those of one process whatever the host count.

  Returns:
    predictions [n, ...], labels [n], weights [n], groups [n] (str), ids [n] (str;
    the protein of each item), loss (float), windowed_proteins (int: proteins read
    whole in ESM windows, `pipeline.windowed_batches`), embeddings [n, D] if with_embeddings,
    chain_row [n] and residue_index [n] (int32; node tasks) if with_positions.
  """
  num_local = mesh_lib.local_device_count(mesh)
  cols: dict[str, list] = collections.defaultdict(list)
  per_batch: dict[str, list] = collections.defaultdict(list)  # loss terms by batch
  for stacked, metas in device_batches.iterate_finite(stream, num_local):
    out = eval_fn(params, mesh_lib.put_global(stacked, mesh))
    out = {k: local_rows(v) for k, v in out.items()}
    for d, meta in enumerate(metas):
      if meta is None:
        continue
      index = int(meta.get("index", len(per_batch["index"])))
      sub = device_batches.tree_unstack(stacked, d)
      per_batch["index"].append(index)
      per_batch["loss_w"].append(float(out["loss"][d]) * float(out["weight_sum"][d]))
      per_batch["weight"].append(float(out["weight_sum"][d]))
      num_real = int(np.sum(sub.graph_mask))
      per_batch["windowed"].append(float(num_real if meta.get("windowed") else 0))
      ids = np.asarray(list(meta.get("ids", [""] * num_real))[:num_real] or [""], str)
      groups = np.asarray(list(meta.get("groups", [""] * num_real))[:num_real]
                          or [""], str)
      if task.level == "node":
        mask = (sub.node_label_mask > 0) & sub.node_mask
        graph_of = np.minimum(sub.node_graph[mask], max(num_real - 1, 0))
        cols["labels"].append(sub.node_labels[mask])
        cols["weights"].append(sub.node_weights[mask])
        embed_key = "node_embeddings"
        if with_positions:
          chain_row, residue_index = _residue_positions(sub, mask)
          cols["chain_row"].append(chain_row)
          cols["residue_index"].append(residue_index)
      else:
        mask = sub.graph_mask.astype(bool)
        graph_of = np.arange(int(mask.sum()))
        cols["labels"].append(sub.graph_labels[mask])
        cols["weights"].append(sub.graph_weights[mask])
        embed_key = "graph_embeddings"
      cols["predictions"].append(out["predictions"][d][mask])
      cols["groups"].append(groups[graph_of])
      cols["ids"].append(ids[graph_of])
      cols["batch"].append(np.full(int(mask.sum()), index, np.int64))
      if with_embeddings:
        cols["embeddings"].append(out[embed_key][d][mask])
  local = {k: np.concatenate(v) for k, v in cols.items()}
  for name in ("predictions", "labels", "weights", "groups", "ids", "batch"):
    local.setdefault(name, np.zeros([0], str if name in ("groups", "ids") else
                                    np.float32))
  result = gather_hosts(local)
  if not len(result["predictions"]):
    raise ValueError("the evaluation split has no labelled items")
  order = np.argsort(result.pop("batch"), kind="stable")  # a batch's items stay in order
  result = {k: v[order] for k, v in result.items()}
  terms = gather_hosts({k: np.asarray(v, np.float64 if k != "index" else np.int64)
                        for k, v in per_batch.items()} if per_batch else
                       {"index": np.zeros([0], np.int64), "loss_w": np.zeros([0]),
                        "weight": np.zeros([0]), "windowed": np.zeros([0])})
  by_index = np.argsort(terms["index"], kind="stable")
  loss_sum = float(np.sum(terms["loss_w"][by_index]))
  weight_sum = float(np.sum(terms["weight"][by_index]))
  result["loss"] = np.float64(loss_sum / max(weight_sum, 1e-12))
  result["windowed_proteins"] = np.int64(round(float(np.sum(terms["windowed"]))))
  return result


def split_metrics(config, collected: dict[str, np.ndarray], split: str | None = None
                  ) -> dict[str, float]:
  """task.metrics of one split, its loss, and how its long chains were read: proteins
  read whole in ESM windows and, if `split` has a sizes.json, proteins with a chain
  longer than data.max_residues (cropped under data.eval_long_chains=first_window)."""
  values = metrics_lib.compute_metrics(
      config.task.metrics, predictions=collected["predictions"],
      labels=collected["labels"], weights=collected["weights"],
      groups=collected["groups"],
      min_group_size=int(config.task.min_group_size))
  values["loss"] = float(collected["loss"])
  values["num_windowed_proteins"] = float(collected.get("windowed_proteins", 0))
  sizes = (budgets_lib.load_sizes(storage.absolute(config.data.dir), split)
           if split and config.data.get("dir") else None)
  if sizes is not None:
    values["num_long_chain_proteins"] = float(
        np.sum(sizes[:, 1] > int(config.data.max_residues)))
  return values


def eval_stream(config, split: str, sub_config, dataset_fn=None):
  """This host's share of the split's planned evaluation batches (or the batches
  `dataset_fn` gives, `train_lib.DatasetFn`)."""
  if dataset_fn is None:
    from bihier_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    dataset_fn = pipeline.make_dataset
  return dataset_fn(storage.absolute(config.data.dir), split, sub_config, training=False,
                    seed=config.seed, process_index=jax.process_index(),
                    process_count=jax.process_count())


def sample_batch(config) -> Batch:
  """A batch of padding only, of the run's first budget: what building and restoring a
  model need (shapes; the parameters do not depend on the values), without reading
  any record."""
  from bihier_jax.data import budgets as budgets_lib  # pylint: disable=g-import-not-at-top
  from bihier_jax.data import layout  # pylint: disable=g-import-not-at-top
  budgets = budgets_lib.bucket_budgets(
      epochs.sub_batch_config(config, jax.device_count()),
      budgets_lib.dataset_sizes(storage.absolute(config.data.dir)))
  return layout.collate([], budgets[0])


def evaluate_splits(config, eval_fn, params, mesh, splits: Sequence[str], *,
                    dataset_fn=None) -> dict[str, dict[str, float]]:
  """Metrics per split; `mesh` is this host's eval mesh (`mesh_lib.local_mesh`), and
  `eval_fn` was jitted for it; results of all hosts are gathered before metrics
  (dataset_fn: as `eval_stream`'s)."""
  sub_config = epochs.sub_batch_config(config, jax.device_count())
  params = mesh_lib.localize(params, mesh)
  results = {}
  for split in splits:
    collected = collect_predictions(eval_fn, params,
                                    eval_stream(config, split, sub_config,
                                                dataset_fn),
                                    mesh, config.task)
    results[split] = split_metrics(config, collected, split)
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
                       step: int, checkpoint: str, note: str = "",
                       long_chains: str = "") -> str:
  """DIR/eval/<split>.json per split and DIR/eval/metrics.md; returns the table.

  Args:
    step: the training step of the evaluated parameters.
    checkpoint: which checkpoint they are: 'best' (selected on validation), 'latest',
      or the step number asked for; stored in every JSON beside `step`.
    note: a line under the metrics.md heading (how the checkpoint was chosen).
    long_chains: data.eval_long_chains of the evaluation, stored in every JSON and
      named in metrics.md ("" : not recorded).
  """
  out_dir = os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  for split, values in results.items():
    with open(os.path.join(out_dir, f"{split}.json"), "w") as f:
      json.dump({k: (None if not np.isfinite(v) else float(v)) for k, v in
                 values.items()} | {"step": step, "checkpoint": checkpoint}
                | ({"eval_long_chains": long_chains} if long_chains else {}), f,
                indent=1, sort_keys=True)
  table = markdown_table(results)
  with open(os.path.join(out_dir, "metrics.md"), "w") as f:
    protocol = (f"Long chains: {long_chains} (data.eval_long_chains)\n\n"
                if long_chains else "")
    f.write(f"Checkpoint {checkpoint} (step {step})\n\n" + (f"{note}\n\n" if note else "")
            + protocol + table)
  return table
