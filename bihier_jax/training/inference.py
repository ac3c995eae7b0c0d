"""Inference from a run directory: evaluate a checkpoint, predict on a structure file.

The library side of `python -m bihier_jax.eval` and `python -m bihier_jax.predict`.
"""

from __future__ import annotations

import os

from absl import logging
import jax
import numpy as np

from bihier_jax.common import residue_constants as rc
from bihier_jax.data import featurize
from bihier_jax.data import input_pipeline
from bihier_jax.training import parallel
from bihier_jax.training.train_lib import (default_dataset_fn, ensure_demo_data,
                                           eval_stream, evaluate_splits, jit_eval_step,
                                           per_device_config, restore_params,
                                           write_eval_results)


def evaluate_checkpoint(config, workdir: str, checkpoint: str = "", splits=None
                        ) -> dict[str, dict[str, float]]:
  """Metrics per split of a run's checkpoint; also written under workdir/eval/."""
  parallel.initialize_distributed(bool(config.train.multi_host))
  ensure_demo_data(config)
  splits = list(splits or config.data.eval_splits)
  dataset_fn = default_dataset_fn()
  mesh = parallel.make_mesh()
  sub_config = per_device_config(config, jax.device_count())
  sample_batch, _ = next(iter(eval_stream(config, dataset_fn, splits[0], sub_config)))
  model, params, step = restore_params(config, workdir, checkpoint, sample_batch, mesh)
  eval_mesh = parallel.local_mesh()
  eval_fn = jit_eval_step(model, config.task, eval_mesh)
  results = evaluate_splits(config, dataset_fn, eval_fn, params, eval_mesh, splits)
  if jax.process_index() == 0:
    table = write_eval_results(workdir, results, step=step,
                               checkpoint=checkpoint or "auto")
    print(f"Checkpoint step {step}\n\n{table}", flush=True)
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
