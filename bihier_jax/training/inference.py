"""Inference from a run directory: evaluate a checkpoint, predict on a structure file.

The library side of `python -m bihier_jax.eval` and `python -m bihier_jax.predict`.
`evaluate_checkpoint` writes, per split, DIR/eval/<split>.json (metrics) and
DIR/eval/<split>_predictions.npz (the scored items; format in `training/pooling.py`).
"""

from __future__ import annotations

import os

from absl import logging
import jax
import numpy as np

from bihier_jax.common import residue_constants as rc
from bihier_jax.data import featurize
from bihier_jax.data import input_pipeline
from bihier_jax.training import evaluation
from bihier_jax.training import parallel
from bihier_jax.training import pooling
from bihier_jax.training.evaluation import (eval_stream, per_device_config,
                                            write_eval_results)
from bihier_jax.training.steps import jit_eval_step
from bihier_jax.training.train_lib import (checkpoint_name, default_dataset_fn,
                                           ensure_demo_data, restore_params)


class _ResiduePositions:
  """Wraps an eval step to record, per scored residue, its chain row and position.

  `evaluation.collect_predictions` keeps the labelled real residues of every real
  sub-batch in order; this wrapper sees the same stacked batches in the same order and
  keeps the same residues (blank sub-batches have no real nodes), so its rows line up
  with the collected items.
  """

  def __init__(self, eval_fn):
    self._eval_fn = eval_fn
    self.chain_row: list[np.ndarray] = []
    self.residue_index: list[np.ndarray] = []

  def __call__(self, params, batch):
    nodes = batch.graph.nodes
    node_mask = evaluation.local_rows(batch.node_mask).astype(bool)
    mask = (evaluation.local_rows(batch.node_label_mask) > 0) & node_mask
    node_graph = evaluation.local_rows(batch.node_graph)
    chain_id = evaluation.local_rows(nodes["chain_id"])
    residue_index = evaluation.local_rows(nodes["residue_index"])
    is_residue = evaluation.local_rows(nodes["node_kind"]) == 0
    for d in range(mask.shape[0]):
      # chain_id = (index in the batch of the example's first chain) + chain_row, in
      # both row layouts; chain row 0 always has residues, so the example's smallest
      # residue chain_id is its first chain's.
      real = is_residue[d] & node_mask[d]
      first_chain = np.full(int(node_graph[d].max(initial=0)) + 1, np.iinfo(np.int32).max)
      np.minimum.at(first_chain, node_graph[d][real], chain_id[d][real])
      m = mask[d]
      self.chain_row.append((chain_id[d][m] - first_chain[node_graph[d][m]])
                            .astype(np.int32))
      self.residue_index.append(residue_index[d][m].astype(np.int32))
    return self._eval_fn(params, batch)

  def arrays(self) -> tuple[np.ndarray, np.ndarray]:
    """(chain_row, residue_index) int32[n] of every host's scored residues."""
    local = {"chain_row": np.concatenate(self.chain_row or [np.zeros([0], np.int32)]),
             "residue_index": np.concatenate(self.residue_index
                                             or [np.zeros([0], np.int32)])}
    full = evaluation._gather_hosts(local)  # pylint: disable=protected-access
    return full["chain_row"], full["residue_index"]


def evaluate_checkpoint(config, workdir: str, checkpoint: str = "", splits=None, *,
                        dataset_fn=None) -> dict[str, dict[str, float]]:
  """Metrics per split of a run's checkpoint; also written under workdir/eval/.

  Args:
    checkpoint: 'best' | 'latest' | a step number | '' (best if any checkpoint has
      validation metrics, else latest). The JSONs record the resolved name and step.
    splits: default config.data.eval_splits.
    dataset_fn: as `train_lib.train_and_evaluate`'s (default: the records pipeline).
  """
  parallel.initialize_distributed(bool(config.train.multi_host))
  ensure_demo_data(config)
  splits = list(splits or config.data.eval_splits)
  dataset_fn = dataset_fn or default_dataset_fn()
  mesh = parallel.make_mesh()
  sub_config = per_device_config(config, jax.device_count())
  sample_batch, _ = next(iter(eval_stream(config, dataset_fn, splits[0], sub_config)))
  checkpoint = checkpoint_name(config, workdir, checkpoint)
  model, params, step = restore_params(config, workdir, checkpoint, sample_batch, mesh)
  eval_mesh = parallel.local_mesh()
  eval_fn = jit_eval_step(model, config.task, eval_mesh)
  # As evaluation.evaluate_splits, keeping each split's items for the predictions file.
  params = parallel.localize(params, eval_mesh)
  results = {}
  for split in splits:
    positions = _ResiduePositions(eval_fn)
    collected = evaluation.collect_predictions(
        positions, params, eval_stream(config, dataset_fn, split, sub_config),
        eval_mesh, config.task)
    results[split] = evaluation.split_metrics(config, collected)
    if config.task.level == "node":
      chain_row, residue_index = positions.arrays()
    else:
      chain_row = residue_index = None
    if jax.process_index() == 0:
      path = pooling.save_predictions(
          os.path.join(workdir, "eval", f"{split}_predictions.npz"), collected,
          task=config.task, split=split, step=step, chain_row=chain_row,
          residue_index=residue_index)
      logging.info("%s predictions (%d items) -> %s", split,
                   collected["labels"].shape[0], path)
  if jax.process_index() == 0:
    table = write_eval_results(workdir, results, step=step, checkpoint=checkpoint)
    print(f"Checkpoint {checkpoint}, step {step}\n\n{table}", flush=True)
  return results


def predict_structure(config, workdir: str, structure_path: str, *, out: str = "",
                      checkpoint: str = "", per_chain: bool = False, chains=None) -> str:
  """Writes the predictions .npz (fields: see bihier_jax/predict.py) for one structure
  file; returns its path."""
  examples = featurize.examples_from_file(
      structure_path, per_chain=per_chain, chain_ids=chains,
      cutoff=float(config.data.cutoff), max_neighbors=int(config.data.max_neighbors))
  too_long = [f"{ex.id} ({max(len(s) for s in ex.sequences)})" for ex in examples
              if max(len(s) for s in ex.sequences) > 1022]
  if too_long:
    raise ValueError(f"{structure_path}: chains longer than ESM-2's 1022 residues: "
                     f"{', '.join(too_long)}")
  # One program for the whole file, rounded so that similar files share it.
  budget = input_pipeline.budget_for(examples, node_multiple=64, edge_multiple=512,
                                     row_multiple=8)
  batch = input_pipeline.collate(examples, budget)
  mesh = parallel.make_mesh(jax.local_devices()[:1])
  model, params, step = restore_params(config, workdir, checkpoint, batch, mesh)
  eval_fn = jit_eval_step(model, config.task, mesh)
  outputs = eval_fn(params, parallel.put_global(parallel.stack([batch]), mesh))
  outputs = {k: np.asarray(jax.device_get(v))[0] for k, v in outputs.items()}

  residue = (batch.node_mask & (batch.graph.nodes["node_kind"] == 0))
  num_proteins = len(examples)
  result = {
      "protein_ids": np.array([ex.id for ex in examples]),
      "residue_protein": batch.node_graph[residue].astype(np.int32),
      "chain_id": np.concatenate([np.asarray(ex.chain_ids)[ex.chain_row]
                                  for ex in examples]),
      "residue_number": np.concatenate([ex.residue_number for ex in examples]),
      "insertion_code": np.concatenate([ex.insertion_code for ex in examples]),
      "residue_type": np.array([rc.RESTYPES[a] for ex in examples for a in ex.aatype]),
      "node_embeddings": outputs["node_embeddings"][residue],
      "graph_embeddings": outputs["graph_embeddings"][:num_proteins],
      "checkpoint_step": np.int64(step),
  }
  if config.task.level == "node":
    result["residue_predictions"] = outputs["predictions"][residue]
  else:
    result["protein_predictions"] = outputs["predictions"][:num_proteins]
  if not out:
    stem = featurize.structure_stem(structure_path)
    out = os.path.join(workdir, "predictions", f"{stem}.npz")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  np.savez(out, **result)
  logging.info("predictions for %d protein(s), %d residues -> %s", num_proteins,
               int(residue.sum()), out)
  print(out, flush=True)
  return out
