"""Inference from a run directory: evaluate a checkpoint, predict on structure files.

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
from bihier_jax.common import structure
from bihier_jax.data import batch_plan
from bihier_jax.data import epochs
from bihier_jax.data import featurize
from bihier_jax.data import layout
from bihier_jax.training import checkpointing
from bihier_jax.training import device_batches
from bihier_jax.training import evaluation
from bihier_jax.training import mesh as mesh_lib
from bihier_jax.training import pooling
from bihier_jax.training import runtime
from bihier_jax.training import steps


def evaluate_checkpoint(config, workdir: str, checkpoint: str = "", splits=None, *,
                        dataset_fn=None) -> dict[str, dict[str, float]]:
  """Metrics per split of a run's checkpoint; also written under workdir/eval/.

  With train.multi_host every process evaluates its share of each split's planned
  batches (`evaluation.eval_stream`); process 0 writes the files.

  Args:
    checkpoint: 'best' | 'latest' | a step number | '' (best if any checkpoint has
      validation metrics, else latest). The JSONs record the resolved name and step.
    splits: default config.data.eval_splits.
    dataset_fn: as `train_lib.train_and_evaluate`'s (default: the records' plan).
  """
  runtime.start_backend(bool(config.train.multi_host))
  runtime.build_data(config)
  splits = list(splits or config.data.eval_splits)
  mesh = mesh_lib.training_mesh(config)
  sub_config = epochs.sub_batch_config(config, jax.device_count())
  sample_batch = (next(iter(evaluation.eval_stream(config, splits[0], sub_config,
                                                   dataset_fn)))[0]
                  if dataset_fn else evaluation.sample_batch(config))
  checkpoint = checkpointing.checkpoint_name(config, workdir, checkpoint)
  model, params, step = checkpointing.restore_params(config, workdir, checkpoint,
                                                     sample_batch, mesh)
  eval_mesh = mesh_lib.local_mesh(mesh_lib.fsdp_size(mesh))
  eval_fn = steps.jit_eval_step(model, config.task, eval_mesh)
  # As evaluation.evaluate_splits, keeping each split's items for the predictions file.
  params = mesh_lib.localize(params, eval_mesh)
  node_task = config.task.level == "node"
  results = {}
  for split in splits:
    collected = evaluation.collect_predictions(
        eval_fn, params, evaluation.eval_stream(config, split, sub_config, dataset_fn),
        eval_mesh,
        config.task, with_positions=node_task)
    results[split] = evaluation.split_metrics(config, collected, split)
    if jax.process_index() == 0:
      path = pooling.save_predictions(
          os.path.join(workdir, "eval", f"{split}_predictions.npz"), collected,
          task=config.task, split=split, step=step,
          chain_row=collected.get("chain_row"),
          residue_index=collected.get("residue_index"))
      logging.info("%s predictions (%d items) -> %s", split,
                   collected["labels"].shape[0], path)
  if jax.process_index() == 0:
    table = evaluation.write_eval_results(workdir, results, step=step,
                                          checkpoint=checkpoint,
                                          long_chains=batch_plan.eval_long_chains(config))
    print(f"Checkpoint {checkpoint}, step {step}\n\n{table}", flush=True)
  return results


def predict_structures(config, workdir: str, loaded, *, out: str,
                       checkpoint: str = "", progress: bool = True) -> dict:
  """Predictions for the proteins `from_files.load` read, in one .npz at `out`.

  Batches them as evaluation does (`layout.inference_batches`), one device per
  process; with several processes (train.multi_host) each runs every process_count-th
  batch, the results are gathered and process 0 writes the file. Fields: see
  bihier_jax/predict.py. Returns {"out", "proteins", "residues", "seconds",
  "compiled_shapes"}; `seconds` counts restore, compile and run, not parsing.
  """
  import time  # pylint: disable=g-import-not-at-top
  import tqdm  # pylint: disable=g-import-not-at-top
  from bihier_jax.models import heads  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  examples = loaded.examples
  batches = layout.inference_batches(examples, config)
  first_budget, first_members = batches[0]
  sample = layout.collate([examples[i] for i in first_members], first_budget)
  mesh = mesh_lib.make_mesh(jax.local_devices()[:1])
  model, params, step = checkpointing.restore_params(config, workdir, checkpoint, sample,
                                                     mesh)
  eval_fn = steps.jit_eval_step(model, config.task, mesh)
  node_task = config.task.level == "node"
  mine = batches[jax.process_index()::jax.process_count()]
  local = {k: [] for k in ("example", "node_embeddings", "graph_embeddings",
                           "predictions")}
  bar = tqdm.tqdm(total=sum(len(m) for _, m in mine), unit="protein", desc="predict",
                  disable=not progress or jax.process_index() != 0, smoothing=0.1)
  with bar:
    for budget, members in mine:
      batch = layout.collate([examples[i] for i in members], budget)
      outputs = eval_fn(params, mesh_lib.put_global(device_batches.stack([batch]), mesh))
      outputs = {k: np.asarray(jax.device_get(v))[0] for k, v in outputs.items()}
      residue = batch.node_mask & (batch.graph.nodes["node_kind"] == 0)
      for g, i in enumerate(members):
        nodes = residue & (batch.node_graph == g)
        local["example"].append(np.array([i]))
        local["node_embeddings"].append(outputs["node_embeddings"][nodes])
        local["graph_embeddings"].append(outputs["graph_embeddings"][g][None])
        local["predictions"].append(outputs["predictions"][nodes] if node_task
                                    else outputs["predictions"][g][None])
      bar.update(len(members))
  per_example = _per_example(local, len(examples), node_task)
  shapes = len({budget for budget, _ in batches})

  result = {
      "protein_ids": np.array([ex.id for ex in examples]),
      "protein_file": np.array(loaded.example_file),
      "protein_incomplete_backbone": np.array(
          [featurize.incomplete_backbone_residues(ex) for ex in examples], np.int32),
      "residue_protein": np.concatenate([np.full([ex.num_residues], p, np.int32)
                                         for p, ex in enumerate(examples)]),
      "chain_id": np.concatenate([np.asarray(ex.chain_ids)[ex.chain_row]
                                  for ex in examples]),
      "residue_number": np.concatenate([ex.residue_number for ex in examples]),
      "insertion_code": np.concatenate([ex.insertion_code for ex in examples]),
      "residue_type": np.array([rc.RESTYPES[a] for ex in examples for a in ex.aatype]),
      "residue_backbone_complete": np.concatenate(
          [~structure.incomplete_backbone(ex.atom_mask) for ex in examples]),
      "node_embeddings": np.concatenate([r["node_embeddings"] for r in per_example]),
      "graph_embeddings": np.stack([r["graph_embeddings"] for r in per_example]),
      "class_names": np.array(heads.class_names(config.task)),
      "prediction_kind": np.array(heads.prediction_kind(config.task)),
      "embedding": np.array(
          f"node_embeddings: per-residue features the {config.task.level}-level head "
          f"reads (model.kind={config.model.kind}, readout={config.model.readout}); "
          "graph_embeddings: their pool per protein"),
      "task_name": np.array(str(config.task.name)),
      "checkpoint_step": np.int64(step),
  }
  key = "residue_predictions" if node_task else "protein_predictions"
  result[key] = (np.concatenate if node_task else np.stack)(
      [r["predictions"] for r in per_example])
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    np.savez(out, **result)
  seconds = time.perf_counter() - start
  n_residues = int(result["residue_protein"].shape[0])
  logging.info("predictions for %d protein(s), %d residues in %d batch(es) of %d "
               "shape(s), %.1f s -> %s", len(examples), n_residues, len(batches),
               shapes, seconds, out)
  return {"out": out, "proteins": len(examples), "residues": n_residues,
          "seconds": seconds, "compiled_shapes": shapes}


def _per_example(local: dict[str, list[np.ndarray]], count: int, node_task: bool
                 ) -> list[dict]:
  """Every host's per-protein outputs (gathered), in protein order: [{node_embeddings,
  graph_embeddings, predictions}] for proteins 0..count-1 (`local`: this host's, one
  array per protein, per-protein values as [1, ...])."""
  names = ("node_embeddings", "graph_embeddings", "predictions")
  rows = {k: [len(a) for a in local[k]] for k in names}
  flat = {k: np.concatenate(v) if v else np.zeros([0]) for k, v in local.items()}
  flat.update({f"{k}_rows": np.asarray(rows[k], np.int64) for k in names})
  full = evaluation.gather_hosts(flat)
  out: list[dict] = [{} for _ in range(count)]
  for k in names:
    pieces = np.split(full[k], np.cumsum(full[f"{k}_rows"])[:-1])
    for i, piece in zip(full["example"].tolist(), pieces):
      out[i][k] = piece
  per_protein = ("graph_embeddings",) + (() if node_task else ("predictions",))
  return [{k: (v[0] if k in per_protein else v) for k, v in r.items()} for r in out]


def predict_structure(config, workdir: str, structure_path: str, *, out: str = "",
                      checkpoint: str = "", per_chain: bool = False, chains=None) -> str:
  """`predict_structures` for one file (no progress bar); returns the .npz path
  (default DIR/predictions/<file stem>.npz).

  Raises:
    structure.StructureError: the file cannot be used (names it and the reason).
  """
  from bihier_jax.data import from_files  # pylint: disable=g-import-not-at-top
  examples, line = from_files.load_file(
      structure_path, **from_files.load_options(config, per_chain=per_chain,
                                                      chains=chains))
  loaded = from_files.Loaded(examples, [structure_path] * len(examples), [line])
  out = out or from_files.default_output(workdir, structure_path)
  return predict_structures(config, workdir, loaded, out=out, checkpoint=checkpoint,
                            progress=False)["out"]
