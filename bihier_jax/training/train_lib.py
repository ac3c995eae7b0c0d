"""The training loop (flax `examples/ogbg_molpcba` shape).

`train_and_evaluate(config, workdir)` is what `python -m bihier_jax.train` runs:
data (the demo set is built on first use), model, optimizer, Orbax checkpoints (resumed
automatically), the data-parallel steps of `steps`, periodic evaluation with host-side
metrics (`evaluation`), TensorBoard summaries, steps/s + ETA, and at the end an
evaluation of every split, a Markdown table and a PNG of the training curves.

Faults: the step skips the update in-graph when the loss or any gradient is not finite
and counts it; `train.max_consecutive_nonfinite` bad steps in a row raise
`NonFiniteLossError` without saving (the last good checkpoint stays the latest one).
SIGTERM (preemptible TPUs) makes the loop save a checkpoint and return cleanly; a
restarted run resumes from the latest checkpoint, input position included, and
reproduces the uninterrupted run's losses (the per-step RNG is fold_in(seed key, step)).

Files under workdir: checkpoints/, metrics.jsonl (every logged scalar), TensorBoard
events, eval/<split>.json + eval/metrics.md, train_curves.png, config.json.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
import json
import os
import signal
import time
from typing import Any

from absl import logging
from clu import metric_writers
from clu import parameter_overview
from clu import periodic_actions
import jax
import ml_collections
import numpy as np

from bihier_jax.common import flops
from bihier_jax.data.batch import Batch
from bihier_jax.training import checkpointing
from bihier_jax.training import evaluation
from bihier_jax.training import optim
from bihier_jax.training import parallel
from bihier_jax.training import plots
from bihier_jax.training import steps

# (data_dir, split, config, *, training, seed, process_index, process_count,
#  skip_batches) -> iterable of (Batch of numpy arrays, meta {'ids', 'groups'}).
DatasetFn = Callable[..., Iterable[tuple[Batch, dict]]]


class NonFiniteLossError(RuntimeError):
  """Too many consecutive steps with a non-finite loss or gradient."""


# --- data ------------------------------------------------------------------------------

def has_records(directory: str) -> bool:
  return os.path.exists(os.path.join(directory, "metadata.json"))


def ensure_demo_data(config: ml_collections.ConfigDict) -> None:
  """Builds the demo dataset into config.data.dir if it is not there (task 'demo')."""
  directory = evaluation.data_dir(config)
  if config.task.name != "demo" or has_records(directory):
    return
  if jax.process_index() == 0:
    logging.warning("demo dataset not found in %s: building it now (about a minute)",
                    directory)
    from data_pipelines import preprocess  # pylint: disable=g-import-not-at-top
    preprocess.main(["demo", "--out", directory, "--workers", "1", "--no-progress"])
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("demo data built")


def default_dataset_fn() -> DatasetFn:
  from bihier_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  return input_pipeline.make_dataset


# --- logging -------------------------------------------------------------------------------

class JsonlWriter(metric_writers.MetricWriter):
  """Appends {"step": s, **scalars} lines to a file (the training-curve source)."""

  def __init__(self, path: str):
    self._path = path

  def write_scalars(self, step, scalars):
    row = {"step": int(step)}
    row.update({k: float(np.asarray(v)) for k, v in scalars.items()})
    with open(self._path, "a") as f:
      f.write(json.dumps(row) + "\n")

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    pass

  def close(self):
    pass


class MatmulThroughput:
  """Achieved matmul TFLOP/s per device over the steps added since the last reading.

  The caller adds each timed step's matmul FLOPs (all devices; `common.flops` counts
  them once per program, i.e. per padding bucket). Time is host wall time between
  readings, which is real step time because the loop fetches each step's metrics.
  `pause()` restarts the clock without counting: after evaluation, checkpointing, and
  any step that compiled a new program.
  """

  def __init__(self, num_devices: int):
    self._num_devices = num_devices
    self.pause()

  def pause(self):
    self._start, self._flops = time.perf_counter(), 0.0

  def add(self, step_flops: float):
    self._flops += step_flops

  def read(self) -> float | None:
    """TFLOP/s per device since the last reading or pause (None if no step added)."""
    now = time.perf_counter()
    elapsed = now - self._start
    value = (self._flops / self._num_devices / elapsed / 1e12
             if self._flops > 0 and elapsed > 0 else None)
    self._start, self._flops = now, 0.0
    return value


def make_writer(workdir: str) -> metric_writers.MetricWriter:
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0, asynchronous=False)
  if jax.process_index() == 0:
    return metric_writers.MultiWriter([writer, JsonlWriter(
        os.path.join(workdir, "metrics.jsonl"))])
  return writer


class _StopSignal:
  """Sets a flag on SIGTERM (restores the previous handler on exit)."""

  def __init__(self):
    self.received = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: no handler, no flag
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint and stopping")
    self.received = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


# --- the loop --------------------------------------------------------------------------------

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       dataset_fn: DatasetFn | None = None) -> dict[str, dict[str, float]]:
  """Trains (resuming from workdir's latest checkpoint), evaluates, writes results.

  Args:
    config: the full config (configs/default.py fields).
    workdir: run directory; created if needed.
    dataset_fn: defaults to `bihier_jax.data.input_pipeline.make_dataset`.

  Returns:
    Final metrics per evaluation split ({} when stopped early by SIGTERM).
  """
  workdir = os.path.abspath(os.path.expanduser(workdir))
  parallel.initialize_distributed(bool(config.train.multi_host))
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=1))
  ensure_demo_data(config)
  dataset_fn = dataset_fn or default_dataset_fn()
  mesh = parallel.make_mesh()
  num_local = parallel.local_device_count(mesh)
  sub_config = evaluation.per_device_config(config, jax.device_count())
  writer = make_writer(workdir)

  def train_stream(skip):
    return dataset_fn(evaluation.data_dir(config), config.data.train_split, sub_config,
                      training=True, seed=config.seed,
                      process_index=jax.process_index(),
                      process_count=jax.process_count(), skip_batches=skip)

  sample_batch, _ = next(iter(train_stream(0)))
  model = steps.build_model(config)
  ckpt = checkpointing.Checkpointer(workdir, keep=config.train.keep_checkpoints,
                                    select_metric=config.task.select_metric,
                                    select_mode=config.task.select_mode)
  position = parallel.InputPosition()
  if ckpt.latest_step() is not None:
    abstract = steps.abstract_train_state(config, model, sample_batch, mesh)
    state, extra, step = ckpt.restore("latest", abstract)
    tx = optim.make_optimizer(config, state.params)
    position = parallel.InputPosition.from_json(extra.get("input_position", {}))
    logging.info("resumed from checkpoint %d (input position %s)", step, position)
  else:
    state, tx = steps.create_train_state(config, model, sample_batch, mesh)
    parameter_overview.log_parameter_overview(jax.device_get(state.params))
    writer.write_hparams({k: v for k, v in _flatten(config.to_dict()).items()})

  train_fn = steps.jit_train_step(model, tx, config.task, mesh)
  eval_mesh = parallel.local_mesh()
  eval_fn = steps.jit_eval_step(model, config.task, eval_mesh)
  batcher = parallel.DeviceBatcher(train_stream(position.resume_from), num_local,
                                   position)
  num_steps = int(config.train.num_steps)
  initial_step = int(jax.device_get(state.step))
  report = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer,
                                           every_steps=config.train.log_every)
  eval_splits = tuple(config.data.eval_splits)
  select_split = config.data.select_split
  max_bad = int(config.train.max_consecutive_nonfinite)
  lr_schedule = optim.learning_rate_schedule(config)
  logging.info("training steps %d..%d on %d devices (%d on this host), global batch %d",
               initial_step, num_steps, jax.device_count(), num_local,
               config.train.batch_size)

  def evaluate_and_save(step):
    results = evaluation.evaluate_splits(config, dataset_fn, eval_fn, state.params,
                                         eval_mesh, eval_splits)
    for split, values in results.items():
      writer.write_scalars(step, {f"{split}/{k}": v for k, v in values.items()
                                  if np.isfinite(v)})
    selected = dict(results.get(select_split, {}))
    for split, values in results.items():
      if split != select_split:
        selected.update({f"{split}/{k}": v for k, v in values.items()})
    ckpt.save(step, state, batcher.position.to_json(), selected, force=True)
    return results

  results: dict[str, dict[str, float]] = {}
  stopped = False
  log_sums: dict[str, float] = {}
  log_count = 0
  throughput = MatmulThroughput(jax.device_count())
  step_flops: dict[Any, int] = {}  # per program (padding bucket)
  with _StopSignal() as stop:
    step = initial_step
    while step < num_steps:
      stacked, _ = next(batcher)
      global_batch = parallel.put_global(stacked, mesh)
      program = tuple((x.shape, x.dtype) for x in jax.tree_util.tree_leaves(global_batch))
      compiles = program not in step_flops
      if compiles:
        step_flops[program] = flops.matmul_flops(train_fn, state, global_batch)
        logging.info("new step program (%d so far): %.4g matmul TFLOP per step, summed "
                     "over %d device(s)", len(step_flops), step_flops[program] / 1e12,
                     jax.device_count())
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, step_metrics = train_fn(state, global_batch)
      step += 1
      step_metrics = jax.device_get(step_metrics)
      if compiles:
        throughput.pause()
      else:
        throughput.add(step_flops[program])
      if int(step_metrics["nonfinite_streak"]) >= max_bad:
        ckpt.wait()
        raise NonFiniteLossError(
            f"step {step}: loss or gradients not finite for {max_bad} consecutive steps "
            f"(train.max_consecutive_nonfinite); updates were skipped, the last "
            f"checkpoint in {ckpt.directory} (step {ckpt.latest_step()}) holds the last "
            f"good parameters")
      if bool(step_metrics["finite"]):
        for k in ("loss", "accuracy", "grad_norm"):
          log_sums[k] = log_sums.get(k, 0.0) + float(step_metrics[k])
        log_count += 1
      report(step)
      if step % config.train.log_every == 0 or step == num_steps:
        scalars = {f"train/{k}": v / max(log_count, 1) for k, v in log_sums.items()}
        scalars["train/learning_rate"] = float(lr_schedule(step - 1))
        scalars["train/nonfinite_steps"] = float(step_metrics["nonfinite_total"])
        tflops = throughput.read()
        if tflops is not None:
          scalars["train/matmul_tflops_per_device"] = tflops
        writer.write_scalars(step, scalars)
        log_sums, log_count = {}, 0
      if step % config.train.eval_every == 0 and step < num_steps:
        evaluate_and_save(step)
        throughput.pause()
      elif step % config.train.checkpoint_every == 0 and step < num_steps:
        ckpt.save(step, state, batcher.position.to_json())
        throughput.pause()
      if stop.received or ckpt.reached_preemption(step):
        ckpt.save(step, state, batcher.position.to_json(), force=True)
        stopped = True
        break
    if not stopped:
      if ckpt.latest_step() == step:  # restarted after the end: evaluate again
        results = evaluation.evaluate_splits(config, dataset_fn, eval_fn, state.params,
                                             eval_mesh, eval_splits)
      else:
        results = evaluate_and_save(step)
  ckpt.wait()
  ckpt.close()
  writer.close()
  del batcher  # releases the endless training input pipeline
  if stopped:
    logging.warning("stopped at step %d by SIGTERM; checkpoint saved", step)
    return {}
  if jax.process_index() == 0:
    table = evaluation.write_eval_results(workdir, results, step=step,
                                          checkpoint=str(step))
    png = plots.plot_training_curves(
        os.path.join(workdir, "metrics.jsonl"),
        os.path.join(workdir, "train_curves.png"),
        eval_metric=config.task.select_metric)
    print(f"\nFinal metrics (step {step}):\n\n{table}\nTraining curves: {png}",
          flush=True)
  return results


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
  return out


# --- inference from a run directory -------------------------------------------------------

def restore_params(config: ml_collections.ConfigDict, workdir: str, which: str,
                   sample_batch: Batch, mesh: jax.sharding.Mesh):
  """(model, params, step) of a run's checkpoint.

  Args:
    which: 'best' | 'latest' | a step number | '' (best if any checkpoint has
      validation metrics, else latest).

  Raises:
    checkpointing.CheckpointError: no such checkpoint, or it cannot be read.
  """
  model = steps.build_model(config)
  ckpt = checkpointing.Checkpointer(workdir, read_only=True,
                                    select_metric=config.task.select_metric,
                                    select_mode=config.task.select_mode)
  if not which:
    which = "best" if ckpt.best_step() is not None else "latest"
  abstract = steps.abstract_train_state(config, model, sample_batch, mesh)
  state, _, step = ckpt.restore(which, abstract)
  ckpt.close()
  return model, state.params, step
