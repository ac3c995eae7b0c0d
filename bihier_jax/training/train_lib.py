"""The training loop (flax `examples/ogbg_molpcba` shape).

`train_and_evaluate(config, workdir)` is what `python -m bihier_jax.train` runs:
data (the demo set is built on first use), model, optimizer, Orbax checkpoints (resumed
automatically), the data-parallel steps of `steps`, periodic evaluation with host-side
metrics (`evaluation`), TensorBoard summaries, steps/s + ETA, and at the end the
results of every eval split, a Markdown table and a PNG of the training curves.

Selection: periodic evaluations score `data.select_split` only (all eval splits with
`train.eval_test_during_training`), and each is saved with its checkpoint. At the end
the checkpoint best by `task.select_metric` / `task.select_mode` on that split is
restored and every eval split is scored on it: those are the reported results
(checkpoint 'best' and its step in eval/<split>.json). Without any checkpoint with a
finite validation metric the last step is reported, named 'latest'. Restarting a
finished run reports the same selected checkpoint again.

Faults: the step skips the update in-graph when the loss or any gradient is not finite
and counts it; `train.max_consecutive_nonfinite` bad steps in a row raise
`NonFiniteLossError` without saving (the last good checkpoint stays the latest one).
SIGTERM (preemptible TPUs) makes the loop save a checkpoint and return cleanly; a
restarted run resumes from the latest checkpoint, input position included, and
reproduces the uninterrupted run's losses (the per-step RNG is fold_in(seed key, step)).
An unreadable newest checkpoint gives way to the newest readable one (its own input
position, so the losses from there are the uninterrupted run's again) and is moved to
checkpoints_unreadable/, never deleted; train.on_corrupt_checkpoint=fail stops instead.
The final selection passes over an unreadable best checkpoint the same way.

Files under workdir: checkpoints/, metrics.jsonl (every logged scalar, including
train/proteins_per_step: real proteins per step, fewer than train.batch_size when the
node budget fills first), TensorBoard events, eval/<split>.json + eval/metrics.md,
train_curves.png, config.json (the resolved config), parameters.txt (the parameter
table). Nothing is written there before the train state exists (resumed or new).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
import functools
import json
import os
import signal
import sys
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
from bihier_jax.training import device_batches
from bihier_jax.training import mesh as mesh_lib
from bihier_jax.training import plots
from bihier_jax import models
from bihier_jax.training import steps
from bihier_jax.training import train_state

class NonFiniteLossError(RuntimeError):
  """Too many consecutive steps with a non-finite loss or gradient."""


# (data_dir, split, config, *, training, seed, process_index, process_count,
#  skip_batches) -> iterable of (Batch of numpy arrays, meta {'ids', 'groups'}): a
# stand-in for the records pipeline (tests' synthetic data). Each host reads its own
# stream, so with several hosts the batches are what the function gives each.
DatasetFn = Callable[..., Iterable[tuple[Batch, dict]]]


# --- data ------------------------------------------------------------------------------

def has_records(directory: str) -> bool:
  from bihier_jax.common import storage  # pylint: disable=g-import-not-at-top
  return storage.exists(storage.join(directory, "metadata.json"))


def ensure_demo_data(config: ml_collections.ConfigDict) -> None:
  """Builds the demo dataset into config.data.dir if it is not there (task 'demo')."""
  directory = evaluation.data_dir(config)
  if config.task.name != "demo" or has_records(directory):
    return
  if jax.process_index() == 0:
    logging.warning("demo dataset not found in %s: building it now (a few seconds)",
                    directory)
    from data_pipelines import preprocess  # pylint: disable=g-import-not-at-top
    preprocess.main(["demo", "--out", directory, "--workers", "1", "--no-progress"])
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("demo data built")


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


class _LoggingWriter(metric_writers.LoggingWriter):
  """Scalars to the log; hyperparameters not (they are DIR/config.json)."""

  def write_hparams(self, hparams):
    del hparams


def make_writer(workdir: str) -> metric_writers.MetricWriter:
  writers = [_LoggingWriter()]
  if jax.process_index() == 0:
    writers += [metric_writers.SummaryWriter(workdir),
                JsonlWriter(os.path.join(workdir, "metrics.jsonl"))]
  return metric_writers.MultiWriter(writers)


def write_parameter_overview(params, path: str) -> None:
  """The parameter table (name, shape, size, mean, std) into a file, its total logged."""
  with open(path, "w") as f:
    f.write(parameter_overview.get_parameter_overview(params) + "\n")
  count = parameter_overview.count_parameters(params)
  logging.info("%d parameters (table: %s)", count, path)


_BACKEND_LOGGED = []  # the backend line is logged once per process


def start_backend(multi_host: bool) -> None:
  """Joins the multi-host job if asked, starts JAX and logs its backend and devices."""
  mesh_lib.initialize_distributed(multi_host)
  if _BACKEND_LOGGED:
    return
  _BACKEND_LOGGED.append(True)
  kinds = sorted({d.device_kind for d in jax.devices()})
  logging.info("JAX backend %s: %d device(s) (%s), %d process(es), %d device(s) on "
               "this one", jax.default_backend().upper(), jax.device_count(),
               ", ".join(kinds), jax.process_count(), jax.local_device_count())


def _checkpointer(config, workdir: str, **kwargs) -> checkpointing.Checkpointer:
  return checkpointing.Checkpointer(workdir, keep=config.train.keep_checkpoints,
                                    select_metric=config.task.select_metric,
                                    select_mode=config.task.select_mode, **kwargs)


class _StopSignal:
  """Notes SIGTERM (preemption) or SIGINT (Ctrl-C) in `received` (the signal's name),
  so the loop saves a checkpoint after the current step and returns; a second SIGINT
  exits at once (status 130, nothing saved). Restores the previous handlers on exit.

  Not with several processes: each would see its signal at another step. There JAX's
  preemption service keeps SIGTERM, and `Checkpointer.reached_preemption` gives every
  process the same step to stop at.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received: str | None = None
    self._previous = {}

  def __enter__(self):
    if jax.process_count() > 1:
      return self
    for signum in self.SIGNALS:
      try:
        self._previous[signum] = signal.signal(signum, self._handle)
      except ValueError:  # not the main thread: no handler, no flag
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if self.received and signum == signal.SIGINT:
      print(f"second SIGINT: aborting at once, without saving (the last checkpoint "
            f"stays; {self.received} was received first)", file=sys.stderr, flush=True)
      os._exit(130)  # pylint: disable=protected-access
    if not self.received:
      logging.warning("%s received: saving a checkpoint after this step and stopping%s",
                      name, " (Ctrl-C again aborts at once)" if name == "SIGINT" else "")
      self.received = name

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)


def resolve_epoch_fields(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` whose *_epochs fields (train.num_epochs, ...) are step counts.

  Steps per epoch come from the packing of the training split's sizes.json
  (`data.epochs.resolve_epochs`); every field it sets is logged.
  """
  from bihier_jax.data import epochs  # pylint: disable=g-import-not-at-top
  resolved = epochs.resolve_epochs(config, evaluation.data_dir(config),
                                   num_devices=jax.device_count())
  for group, field, target in epochs.EPOCH_FIELDS:
    value = float(config[group].get(field, 0) or 0) if group in config else 0.0
    if value > 0:
      logging.info("%s.%s=%g epochs -> %s.%s=%d steps (%.2f steps per epoch)", group,
                   field, value, group, target, resolved[group][target],
                   resolved.train.steps_per_epoch)
  return resolved


# --- the loop --------------------------------------------------------------------------------

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       dataset_fn: DatasetFn | None = None) -> dict[str, dict[str, float]]:
  """Trains (resuming from workdir's latest checkpoint), evaluates, writes results.

  Args:
    config: the full config (configs/default.py fields).
    workdir: run directory; created if needed.
    dataset_fn: batches instead of the records of config.data.dir (default: the
      records' global plan, `input_pipeline.make_planner`; see DatasetFn).

  Returns:
    Final metrics per evaluation split, all of the selected checkpoint ({} when stopped
    early by SIGTERM).
  """
  from bihier_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  workdir = os.path.abspath(os.path.expanduser(workdir))
  start_backend(bool(config.train.multi_host))
  ensure_demo_data(config)
  config = resolve_epoch_fields(config)  # before the schedule and the loop read steps
  mesh = mesh_lib.training_mesh(config)
  num_local = mesh_lib.local_device_count(mesh)
  sub_config = evaluation.per_device_config(config, jax.device_count())

  def given_stream(skip):
    return dataset_fn(evaluation.data_dir(config), config.data.train_split, sub_config,
                      training=True, seed=config.seed, process_index=jax.process_index(),
                      process_count=jax.process_count(), skip_batches=skip)

  sample_batch = (next(iter(given_stream(0)))[0] if dataset_fn else
                  evaluation.sample_batch(config))
  model = models.build_model(config)
  on_corrupt = config.train.get("on_corrupt_checkpoint", "fallback")
  # Start-up writes nothing into workdir until the state exists (resumed or new).
  ckpt = (_checkpointer(config, workdir)
          if os.path.isdir(os.path.join(workdir, "checkpoints")) else None)
  position = device_batches.InputPosition()
  if ckpt is not None and ckpt.latest_step() is not None:
    abstract = train_state.abstract_train_state(config, model, sample_batch, mesh)
    try:
      # Unreadable newer steps are moved aside: the run writes them again.
      state, extra, step = ckpt.restore("latest", abstract, on_corrupt=on_corrupt,
                                        set_aside=True)
    except checkpointing.CheckpointError:
      ckpt.close()
      raise
    tx = optim.make_optimizer(config)
    position = device_batches.InputPosition.from_json(extra.get("input_position", {}))
    logging.info("resumed from checkpoint %d (input position %s)", step, position)
    fresh = False
  else:
    state, tx = train_state.create_train_state(config, model, sample_batch, mesh)
    fresh = True
  os.makedirs(workdir, exist_ok=True)
  ckpt = ckpt or _checkpointer(config, workdir)
  writer = make_writer(workdir)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=1))
    if fresh:
      # This host's copy: a global array split over hosts' devices is not all here.
      local = mesh_lib.localize(state.params,
                                mesh_lib.local_mesh(mesh_lib.fsdp_size(mesh)))
      write_parameter_overview(jax.device_get(local),
                               os.path.join(workdir, "parameters.txt"))
  if fresh:
    writer.write_hparams({k: v for k, v in _flatten(config.to_dict()).items()})

  train_fn = steps.jit_train_step(model, tx, config.task, mesh, state)
  eval_mesh = mesh_lib.local_mesh(mesh_lib.fsdp_size(mesh))
  eval_fn = steps.jit_eval_step(model, config.task, eval_mesh)
  # One update: train.grad_accum_steps sub-batches per device, of one global plan.
  group_size = jax.device_count() * evaluation.accumulation_steps(config)
  if dataset_fn is None:
    planner = input_pipeline.make_planner(evaluation.data_dir(config),
                                          config.data.train_split, sub_config,
                                          training=True, seed=config.seed)
    batcher = device_batches.StepInput(planner, group_size,
                                 mesh_lib.host_rows(mesh, group_size), position,
                                 functools.partial(input_pipeline.pack_planned, planner))
  else:
    batcher = device_batches.DeviceBatcher(given_stream(position.resume_from),
                                     num_local * evaluation.accumulation_steps(config),
                                     position)
  num_steps = int(config.train.num_steps)
  initial_step = int(jax.device_get(state.step))
  report = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer,
                                           every_steps=config.train.log_every)
  eval_splits = tuple(config.data.eval_splits)
  select_split = config.data.select_split
  has_validation = bool(select_split) and select_split in eval_splits
  # Held-out splits stay unseen until the end unless the config asks to log them.
  periodic_splits = (eval_splits if config.train.eval_test_during_training
                     else (select_split,) if has_validation else ())
  max_bad = int(config.train.max_consecutive_nonfinite)
  lr_schedule = optim.learning_rate_schedule(config)
  logging.info("training steps %d..%d on %d devices (%d on this host), global batch %d "
               "proteins at most (train.batch_size; the node budget packs fewer, see "
               "train/proteins_per_step); periodic evaluation of %s", initial_step,
               num_steps, jax.device_count(), num_local, config.train.batch_size,
               ", ".join(periodic_splits) or "no split")
  if not has_validation:
    logging.warning("data.select_split %r is not one of data.eval_splits %s: no "
                    "checkpoint is selected, the final results are the last step's",
                    select_split, eval_splits)

  evaluated: dict[int, dict[str, dict[str, float]]] = {}  # step -> split -> metrics

  def evaluate(step, params, splits):
    """Metrics of `splits` (this process's evaluations of `step` are reused)."""
    done = evaluated.setdefault(step, {})
    missing = [s for s in splits if s not in done]
    if missing:
      done.update(evaluation.evaluate_splits(config, eval_fn, params, eval_mesh,
                                             missing, dataset_fn=dataset_fn))
    return {s: done[s] for s in splits}

  def evaluate_and_save(step, *, replace=False):
    results = evaluate(step, state.params, periodic_splits)
    for split, values in results.items():
      writer.write_scalars(step, {f"{split}/{k}": v for k, v in values.items()
                                  if np.isfinite(v)})
    ckpt.save(step, state, batcher.position.to_json(),
              _checkpoint_metrics(results, select_split), force=True, replace=replace)

  stopped = False
  log_sums: dict[str, float] = {}
  log_count = 0
  proteins, proteins_steps = 0, 0  # real graphs over the log window, for its mean
  run_proteins, run_steps = 0, 0  # the same over this process's whole run
  throughput = MatmulThroughput(jax.device_count())
  step_flops: dict[Any, int] = {}  # per program (padding bucket)
  with _StopSignal() as stop:
    step = initial_step
    while step < num_steps:
      stacked, _ = next(batcher)
      # graph_mask marks real proteins only (jraph's padding graph is False).
      real_graphs = int(np.sum(stacked.graph_mask))
      global_batch = mesh_lib.put_global(stacked, mesh)
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
      proteins += real_graphs
      proteins_steps += 1
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
        window = _sum_over_hosts(proteins)
        scalars["train/proteins_per_step"] = window / proteins_steps
        run_proteins += window
        run_steps += proteins_steps
        tflops = throughput.read()
        if tflops is not None:
          scalars["train/matmul_tflops_per_device"] = tflops
        writer.write_scalars(step, scalars)
        log_sums, log_count = {}, 0
        proteins, proteins_steps = 0, 0
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
      if ckpt.latest_step() != step:
        evaluate_and_save(step)
      elif has_validation and ckpt.metrics(step) is None:
        # A restart after a stop at the last step: that checkpoint has no validation
        # metrics yet, and without them it could not compete for best.
        evaluate_and_save(step, replace=True)
  batcher.close()  # releases the endless training input pipeline
  del batcher
  results: dict[str, dict[str, float]] = {}
  if not stopped:
    ckpt.wait()  # the keep policy has run: the best checkpoint is on disk
    best = ckpt.best_step() if has_validation else None
    params = state.params if best in (None, step) else None
    if params is None:
      logging.info("restoring the best checkpoint (step %d) for the final results", best)
      abstract = train_state.abstract_train_state(config, model, sample_batch, mesh)
      state = None  # frees the training state before the restore
      # An unreadable best gives way to the next best readable one (on_corrupt).
      restored, _, best = ckpt.restore("best", abstract, on_corrupt=on_corrupt,
                                       set_aside=True)
      params = restored.params
    report_step, report_name, note = _describe_selection(config, best, step)
    results = evaluate(report_step, params, eval_splits)
    for split, values in results.items():
      if split != select_split:
        writer.write_scalars(report_step, {f"{split}/{k}": v for k, v in values.items()
                                           if np.isfinite(v)})
  ckpt.wait()
  ckpt.close()
  writer.close()
  if stopped:
    logging.warning("stopped by %s at step %d: checkpoint %d saved in %s; the same "
                    "command resumes from it", stop.received or "preemption", step, step,
                    ckpt.directory)
    return {}
  per_step = (f"{run_proteins / run_steps:.2f} real proteins per step on average "
              f"(train.batch_size {config.train.batch_size})" if run_steps else "")
  if per_step:
    logging.info("steps %d..%d: %s", initial_step, step, per_step)
  if jax.process_index() == 0:
    table = evaluation.write_eval_results(workdir, results, step=report_step,
                                          checkpoint=report_name, note=note)
    png = plots.plot_training_curves(
        os.path.join(workdir, "metrics.jsonl"),
        os.path.join(workdir, "train_curves.png"),
        eval_metric=config.task.select_metric)
    print(f"\nFinal metrics: checkpoint {report_name}, step {report_step} "
          f"(trained to step {step}). {note}\n\n{table}\n"
          + (f"Training: {per_step}.\n" if per_step else "")
          + f"Training curves: {png}", flush=True)
  return results


def _checkpoint_metrics(results: dict[str, dict[str, float]], select_split: str
                        ) -> dict[str, float] | None:
  """What a checkpoint stores for selection: the select split's metrics as they are,
  other splits' as '<split>/<name>' (None without select-split metrics)."""
  if select_split not in results:
    return None
  selected = dict(results[select_split])
  for split, values in results.items():
    if split != select_split:
      selected.update({f"{split}/{k}": v for k, v in values.items()})
  return selected


def _describe_selection(config, best: int | None, last_step: int
                        ) -> tuple[int, str, str]:
  """(step, checkpoint name 'best' | 'latest', a sentence) of the reported results."""
  select = f"{config.data.select_split} {config.task.select_metric}"
  if best is None:
    note = (f"No checkpoint has a finite validation {select} (data.select_split in "
            f"data.eval_splits, task.select_metric): nothing was selected, these are "
            f"the LAST step's metrics.")
    logging.warning("%s", note)
    return last_step, "latest", note
  return best, "best", (f"Selected on {select} ({config.task.select_mode}) among the "
                        f"checkpoints evaluated during training.")


def _sum_over_hosts(value: int) -> int:
  """`value` summed over every process (each counts its own sub-batches)."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return int(np.sum(multihost_utils.process_allgather(np.array([value]))))


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

def checkpoint_name(config: ml_collections.ConfigDict, workdir: str, which: str) -> str:
  """What `which` names: '' -> 'best' if any checkpoint has a finite validation metric,
  else 'latest'; anything else as given ('best' | 'latest' | a step number)."""
  if which:
    return str(which)
  with checkpointing.Checkpointer(workdir, read_only=True,
                                  select_metric=config.task.select_metric,
                                  select_mode=config.task.select_mode) as ckpt:
    best = ckpt.best_step()
  return "best" if best is not None else "latest"


def restore_params(config: ml_collections.ConfigDict, workdir: str, which: str,
                   sample_batch: Batch, mesh: jax.sharding.Mesh):
  """(model, params, step) of a run's checkpoint.

  Args:
    which: 'best' | 'latest' | a step number | '' (best if any checkpoint has
      validation metrics, else latest). An unreadable 'best' / 'latest' gives way to
      the next best / newest readable one, with a warning (train.on_corrupt_checkpoint
      = fail raises instead); nothing is moved or deleted.

  Raises:
    checkpointing.CheckpointError: no such checkpoint, or it cannot be read.
  """
  model = models.build_model(config)
  which = checkpoint_name(config, workdir, which)
  with checkpointing.Checkpointer(workdir, read_only=True,
                                  select_metric=config.task.select_metric,
                                  select_mode=config.task.select_mode) as ckpt:
    abstract = train_state.abstract_train_state(config, model, sample_batch, mesh)
    state, _, step = ckpt.restore(
        which, abstract, on_corrupt=config.train.get("on_corrupt_checkpoint", "fallback"))
  return model, state.params, step
