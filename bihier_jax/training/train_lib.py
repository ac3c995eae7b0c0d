"""The training loop (flax `examples/ogbg_molpcba` shape): `train_and_evaluate(config,
workdir)` is what `python -m bihier_jax.train` runs.

It reads top to bottom: restore the latest readable checkpoint or start fresh, run the
steps (periodic evaluation of `data.select_split`, checkpoints, a save on SIGTERM /
SIGINT, non-finite updates skipped in-graph), select the final checkpoint by
`task.select_metric` and score every eval split on it, write the report. Public:
train_and_evaluate, resolve_epoch_fields, NonFiniteLossError, DatasetFn.
Selection, checkpoints, exact resume, faults and the files a run writes:
docs/training.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
import dataclasses
import functools
import os
from typing import Any

from absl import logging
from clu import periodic_actions
import jax
import ml_collections
import numpy as np

from bihier_jax.common import flops
from bihier_jax.common import storage
from bihier_jax.data import batch_plan
from bihier_jax.data import epochs
from bihier_jax.data.batch import Batch
from bihier_jax import models
from bihier_jax.training import checkpointing
from bihier_jax.training import device_batches
from bihier_jax.training import evaluation
from bihier_jax.training import mesh as mesh_lib
from bihier_jax.training import optim
from bihier_jax.training import plots
from bihier_jax.training import runtime
from bihier_jax.training import steps
from bihier_jax.training import train_state
from bihier_jax.training import writers


class NonFiniteLossError(RuntimeError):
  """Too many consecutive steps with a non-finite loss or gradient."""


# (data_dir, split, config, *, training, seed, process_index, process_count,
#  skip_batches) -> iterable of (Batch of numpy arrays, meta {'ids', 'groups'}): a
# stand-in for the records pipeline (tests' synthetic data). Each host reads its own
# stream, so with several hosts the batches are what the function gives each.
DatasetFn = Callable[..., Iterable[tuple[Batch, dict]]]


def resolve_epoch_fields(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` whose *_epochs fields (train.num_epochs, ...) are step counts.

  Steps per epoch come from the packing of the training split's sizes.json
  (`data.epochs.resolve_epochs`); every field it sets is logged.
  """
  resolved = epochs.resolve_epochs(config, storage.absolute(config.data.dir),
                                   num_devices=jax.device_count())
  for group, field, target in epochs.EPOCH_FIELDS:
    value = float(config[group].get(field, 0) or 0) if group in config else 0.0
    if value > 0:
      logging.info("%s.%s=%g epochs -> %s.%s=%d steps (%.2f steps per epoch)", group,
                   field, value, group, target, resolved[group][target],
                   resolved.train.steps_per_epoch)
  return resolved


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       dataset_fn: DatasetFn | None = None) -> dict[str, dict[str, float]]:
  """Trains (resuming from workdir's latest checkpoint), evaluates, writes results.

  Args:
    config: the full config (configs/default.py fields).
    workdir: run directory; created if needed.
    dataset_fn: batches instead of the records of config.data.dir (default: the
      records' global plan, `pipeline.make_planner`; see DatasetFn).

  Returns:
    Final metrics per evaluation split, all of the selected checkpoint ({} when stopped
    early by SIGTERM).
  """
  workdir = os.path.abspath(os.path.expanduser(workdir))
  runtime.start_backend(bool(config.train.multi_host))
  runtime.build_data(config)
  config = resolve_epoch_fields(config)  # before the schedule and the loop read steps
  run = _Run.start(config, workdir, dataset_fn)
  state, tx, position = _restore_or_init(run)
  _open_run_dir(run, state, fresh=position is None)
  train_fn = steps.jit_train_step(run.model, tx, config.task, run.mesh, state)
  batcher = _training_input(run, position or device_batches.InputPosition())
  with runtime.StopSignal() as stop:
    state, step, log = _run_steps(run, state, train_fn, batcher, stop)
  batcher.close()  # releases the endless training input pipeline
  del batcher
  held = [state]  # _select_final drops the last reference before restoring the best
  del state
  results = None if log.stopped else _select_final(run, held, step)
  run.ckpt.wait()
  run.ckpt.close()
  run.writer.close()
  if log.stopped:
    logging.warning("stopped by %s at step %d: checkpoint %d saved in %s; the same "
                    "command resumes from it", stop.received or "preemption", step, step,
                    run.ckpt.directory)
    return {}
  _write_report(run, results, step, log)
  return results.metrics


@dataclasses.dataclass
class _Run:
  """What the phases of one run share (set up by `start`, the writers by
  `_open_run_dir`)."""
  config: ml_collections.ConfigDict
  workdir: str
  dataset_fn: DatasetFn | None
  mesh: jax.sharding.Mesh
  eval_mesh: jax.sharding.Mesh
  sub_config: ml_collections.ConfigDict
  sample_batch: Batch
  model: Any
  evaluations: "_Evaluations" = None
  ckpt: checkpointing.Checkpointer | None = None
  writer: Any = None

  @classmethod
  def start(cls, config, workdir, dataset_fn) -> "_Run":
    mesh = mesh_lib.training_mesh(config)
    sub_config = epochs.sub_batch_config(config, jax.device_count())
    run = cls(config, workdir, dataset_fn, mesh,
              mesh_lib.local_mesh(mesh_lib.fsdp_size(mesh)), sub_config, None, None)
    run.sample_batch = (next(iter(run.given_stream(0)))[0] if dataset_fn else
                        evaluation.sample_batch(config))
    run.model = models.build_model(config)
    return run

  @property
  def data_dir(self) -> str:
    return storage.absolute(self.config.data.dir)

  @property
  def select_split(self) -> str:
    return self.config.data.select_split

  @property
  def has_validation(self) -> bool:
    return bool(self.select_split) and self.select_split in self.config.data.eval_splits

  @property
  def periodic_splits(self) -> tuple[str, ...]:
    # Held-out splits stay unseen until the end unless the config asks to log them.
    if self.config.train.eval_test_during_training:
      return tuple(self.config.data.eval_splits)
    return (self.select_split,) if self.has_validation else ()

  @property
  def on_corrupt(self) -> str:
    return self.config.train.get("on_corrupt_checkpoint", "fallback")

  def given_stream(self, skip: int):
    return self.dataset_fn(
        self.data_dir, self.config.data.train_split, self.sub_config, training=True,
        seed=self.config.seed, process_index=jax.process_index(),
        process_count=jax.process_count(), skip_batches=skip)

  def abstract_state(self):
    return train_state.abstract_train_state(self.config, self.model, self.sample_batch,
                                            self.mesh)


def _restore_or_init(run: _Run):
  """(state, optimizer, input position) of the latest readable checkpoint, or a fresh
  state and None. Start-up writes nothing into workdir until the state exists."""
  ckpt = (checkpointing.Checkpointer.for_run(run.config, run.workdir)
          if os.path.isdir(os.path.join(run.workdir, "checkpoints")) else None)
  if ckpt is None or ckpt.latest_step() is None:
    run.ckpt = ckpt
    state, tx = train_state.create_train_state(run.config, run.model, run.sample_batch,
                                               run.mesh)
    return state, tx, None
  try:
    # Unreadable newer steps are moved aside: the run writes them again.
    state, extra, step = ckpt.restore("latest", run.abstract_state(),
                                      on_corrupt=run.on_corrupt, set_aside=True)
  except checkpointing.CheckpointError:
    ckpt.close()
    raise
  run.ckpt = ckpt
  position = device_batches.InputPosition.from_json(extra.get("input_position", {}))
  logging.info("resumed from checkpoint %d (input position %s)", step, position)
  return state, optim.make_optimizer(run.config), position


def _open_run_dir(run: _Run, state, *, fresh: bool) -> None:
  """The run directory, its checkpointer and writers, config.json and (fresh runs)
  parameters.txt and the hyperparameters."""
  os.makedirs(run.workdir, exist_ok=True)
  run.ckpt = run.ckpt or checkpointing.Checkpointer.for_run(run.config, run.workdir)
  run.writer = writers.make_writer(run.workdir)
  if jax.process_index() == 0:
    with open(os.path.join(run.workdir, "config.json"), "w") as f:
      f.write(run.config.to_json_best_effort(indent=1))
    if fresh:
      # This host's copy: a global array split over hosts' devices is not all here.
      local = mesh_lib.localize(state.params, run.eval_mesh)
      writers.write_parameter_overview(jax.device_get(local),
                                       os.path.join(run.workdir, "parameters.txt"))
  if fresh:
    run.writer.write_hparams(writers.flat_config(run.config.to_dict()))
  eval_fn = steps.jit_eval_step(run.model, run.config.task, run.eval_mesh)
  run.evaluations = _Evaluations(run, eval_fn)


def _training_input(run: _Run, position: device_batches.InputPosition):
  """This host's stacked sub-batches of every step, from `position` on."""
  from bihier_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  accum = epochs.accumulation_steps(run.config)
  if run.dataset_fn is not None:
    return device_batches.DeviceBatcher(
        run.given_stream(position.resume_from),
        mesh_lib.local_device_count(run.mesh) * accum, position)
  # One update: train.grad_accum_steps sub-batches per device, of one global plan.
  group_size = jax.device_count() * accum
  planner = pipeline.make_planner(run.data_dir, run.config.data.train_split,
                                  run.sub_config, training=True, seed=run.config.seed)
  return device_batches.StepInput(planner, group_size,
                                  mesh_lib.host_rows(run.mesh, group_size), position,
                                  functools.partial(pipeline.pack_planned, planner))


class _Evaluations:
  """Metrics per step and split, each evaluated once in this process."""

  def __init__(self, run: _Run, eval_fn):
    self._run, self._eval_fn = run, eval_fn
    self._done: dict[int, dict[str, dict[str, float]]] = {}  # step -> split -> metrics

  def __call__(self, step: int, params, splits) -> dict[str, dict[str, float]]:
    done = self._done.setdefault(step, {})
    missing = [s for s in splits if s not in done]
    if missing:
      done.update(evaluation.evaluate_splits(self._run.config, self._eval_fn, params,
                                             self._run.eval_mesh, missing,
                                             dataset_fn=self._run.dataset_fn))
    return {s: done[s] for s in splits}

  def evaluate_and_save(self, step: int, state, position, *, replace=False) -> None:
    """Scores the periodic splits at `step` and saves the checkpoint with them."""
    run = self._run
    results = self(step, state.params, run.periodic_splits)
    for split, values in results.items():
      run.writer.write_scalars(step, _finite(split, values))
    run.ckpt.save(step, state, position.to_json(),
                  _checkpoint_metrics(results, run.select_split), force=True,
                  replace=replace)


def _finite(split: str, values: dict[str, float]) -> dict[str, float]:
  return {f"{split}/{k}": v for k, v in values.items() if np.isfinite(v)}


class _StepLog:
  """The log window's and the run's counters: train scalars, real proteins per step,
  matmul throughput and the FLOPs of each step program (padding bucket)."""

  def __init__(self, run: _Run, initial_step: int):
    self.initial_step = initial_step
    self.stopped = False  # by a signal or a preemption notice, checkpoint saved
    self._writer = run.writer
    self._lr_schedule = optim.learning_rate_schedule(run.config)
    self._throughput = writers.MatmulThroughput(jax.device_count())
    self._step_flops: dict[Any, int] = {}  # per program
    self._sums: dict[str, float] = {}
    self._finite_steps = 0
    self._proteins, self._steps = 0, 0  # real graphs over the window, for its mean
    self._run_proteins, self._run_steps = 0, 0  # the same over this process's run

  def program(self, train_fn, state, global_batch) -> tuple[Any, bool]:
    """(the step's program key, whether it compiles now, logging its FLOPs)."""
    program = tuple((x.shape, x.dtype) for x in jax.tree_util.tree_leaves(global_batch))
    compiles = program not in self._step_flops
    if compiles:
      self._step_flops[program] = flops.matmul_flops(train_fn, state, global_batch)
      logging.info("new step program (%d so far): %.4g matmul TFLOP per step, summed "
                   "over %d device(s)", len(self._step_flops),
                   self._step_flops[program] / 1e12, jax.device_count())
    return program, compiles

  def add(self, program, compiles: bool, real_graphs: int) -> None:
    self._proteins += real_graphs
    self._steps += 1
    if compiles:
      self._throughput.pause()
    else:
      self._throughput.add(self._step_flops[program])

  def add_finite(self, step_metrics) -> None:
    if bool(step_metrics["finite"]):
      for k in ("loss", "accuracy", "grad_norm"):
        self._sums[k] = self._sums.get(k, 0.0) + float(step_metrics[k])
      self._finite_steps += 1

  def pause(self) -> None:
    self._throughput.pause()

  def write(self, step: int, step_metrics) -> None:
    """The window's train/* scalars at `step`; starts the next window."""
    scalars = {f"train/{k}": v / max(self._finite_steps, 1) for k, v in self._sums.items()}
    scalars["train/learning_rate"] = float(self._lr_schedule(step - 1))
    scalars["train/nonfinite_steps"] = float(step_metrics["nonfinite_total"])
    window = _sum_over_hosts(self._proteins)
    scalars["train/proteins_per_step"] = window / self._steps
    self._run_proteins += window
    self._run_steps += self._steps
    tflops = self._throughput.read()
    if tflops is not None:
      scalars["train/matmul_tflops_per_device"] = tflops
    self._writer.write_scalars(step, scalars)
    self._sums, self._finite_steps = {}, 0
    self._proteins, self._steps = 0, 0

  def per_step(self, batch_size: int) -> str:
    """The run's mean real proteins per step, as a sentence ('' before any log)."""
    if not self._run_steps:
      return ""
    return (f"{self._run_proteins / self._run_steps:.2f} real proteins per step on "
            f"average (train.batch_size {batch_size})")


def _run_steps(run: _Run, state, train_fn, batcher, stop: runtime.StopSignal):
  """Steps to train.num_steps (or a stop); (state, last step, the _StepLog)."""
  t = run.config.train
  num_steps, max_bad = int(t.num_steps), int(t.max_consecutive_nonfinite)
  step = int(jax.device_get(state.step))
  log = _StepLog(run, step)
  report = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=run.writer,
                                           every_steps=t.log_every)
  _log_start(run, step)
  while step < num_steps:
    stacked, _ = next(batcher)
    # graph_mask marks real proteins only (jraph's padding graph is False).
    real_graphs = int(np.sum(stacked.graph_mask))
    global_batch = mesh_lib.put_global(stacked, run.mesh)
    program, compiles = log.program(train_fn, state, global_batch)
    with jax.profiler.StepTraceAnnotation("train", step_num=step):
      state, step_metrics = train_fn(state, global_batch)
    step += 1
    step_metrics = jax.device_get(step_metrics)
    log.add(program, compiles, real_graphs)
    if int(step_metrics["nonfinite_streak"]) >= max_bad:
      run.ckpt.wait()
      raise NonFiniteLossError(
          f"step {step}: loss or gradients not finite for {max_bad} consecutive steps "
          f"(train.max_consecutive_nonfinite); updates were skipped, the last "
          f"checkpoint in {run.ckpt.directory} (step {run.ckpt.latest_step()}) holds "
          f"the last good parameters")
    log.add_finite(step_metrics)
    report(step)
    if step % t.log_every == 0 or step == num_steps:
      log.write(step, step_metrics)
    if step % t.eval_every == 0 and step < num_steps:
      run.evaluations.evaluate_and_save(step, state, batcher.position)
      log.pause()
    elif step % t.checkpoint_every == 0 and step < num_steps:
      run.ckpt.save(step, state, batcher.position.to_json())
      log.pause()
    if stop.received or run.ckpt.reached_preemption(step):
      run.ckpt.save(step, state, batcher.position.to_json(), force=True)
      log.stopped = True
      return state, step, log
  if run.ckpt.latest_step() != step:
    run.evaluations.evaluate_and_save(step, state, batcher.position)
  elif run.has_validation and run.ckpt.metrics(step) is None:
    # A restart after a stop at the last step: that checkpoint has no validation
    # metrics yet, and without them it could not compete for best.
    run.evaluations.evaluate_and_save(step, state, batcher.position, replace=True)
  return state, step, log


def _log_start(run: _Run, initial_step: int) -> None:
  c = run.config
  logging.info("training steps %d..%d on %d devices (%d on this host), global batch %d "
               "proteins at most (train.batch_size; the node budget packs fewer, see "
               "train/proteins_per_step); periodic evaluation of %s", initial_step,
               int(c.train.num_steps), jax.device_count(),
               mesh_lib.local_device_count(run.mesh), c.train.batch_size,
               ", ".join(run.periodic_splits) or "no split")
  if not run.has_validation:
    logging.warning("data.select_split %r is not one of data.eval_splits %s: no "
                    "checkpoint is selected, the final results are the last step's",
                    run.select_split, tuple(c.data.eval_splits))


@dataclasses.dataclass
class _Final:
  metrics: dict[str, dict[str, float]]  # split -> metrics of the reported checkpoint
  step: int
  name: str  # 'best' | 'latest'
  note: str  # how it was selected, one sentence


def _select_final(run: _Run, held: list, step: int) -> _Final:
  """Every eval split's metrics of the checkpoint best on the select split (restored
  if it is not the last step), else of the last step (`held`: [the training state])."""
  state = held.pop()
  run.ckpt.wait()  # the keep policy has run: the best checkpoint is on disk
  best = run.ckpt.best_step() if run.has_validation else None
  params = state.params if best in (None, step) else None
  if params is None:
    logging.info("restoring the best checkpoint (step %d) for the final results", best)
    abstract = run.abstract_state()
    state = None  # frees the training state before the restore
    # An unreadable best gives way to the next best readable one (on_corrupt).
    restored, _, best = run.ckpt.restore("best", abstract, on_corrupt=run.on_corrupt,
                                         set_aside=True)
    params = restored.params
  report_step, report_name, note = _describe_selection(run.config, best, step)
  results = run.evaluations(report_step, params, tuple(run.config.data.eval_splits))
  for split, values in results.items():
    if split != run.select_split:
      run.writer.write_scalars(report_step, _finite(split, values))
  return _Final(results, report_step, report_name, note)


def _write_report(run: _Run, final: _Final, step: int, log: _StepLog) -> None:
  """Logs the run's proteins per step; process 0 writes eval/, the training curves
  and prints the final table."""
  per_step = log.per_step(run.config.train.batch_size)
  if per_step:
    logging.info("steps %d..%d: %s", log.initial_step, step, per_step)
  if jax.process_index() != 0:
    return
  table = evaluation.write_eval_results(
      run.workdir, final.metrics, step=final.step, checkpoint=final.name, note=final.note,
      long_chains=batch_plan.eval_long_chains(run.config))
  png = plots.plot_training_curves(
      os.path.join(run.workdir, "metrics.jsonl"),
      os.path.join(run.workdir, "train_curves.png"),
      eval_metric=run.config.task.select_metric)
  print(f"\nFinal metrics: checkpoint {final.name}, step {final.step} "
        f"(trained to step {step}). {final.note}\n\n{table}\n"
        + (f"Training: {per_step}.\n" if per_step else "")
        + f"Training curves: {png}", flush=True)


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
