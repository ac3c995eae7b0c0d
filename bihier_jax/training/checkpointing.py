"""Orbax checkpoints of a training run: keep the last N and the best by a metric.

Public: Checkpointer (save / restore / rank the steps of DIR/checkpoints/;
`Checkpointer.for_run(config, workdir)`), checkpoint_name, restore_params,
CheckpointError, CheckpointMismatchError, tree_difference, SELECT_MODES, ON_CORRUPT.
A checkpoint holds the TrainState and a JSON item (input position, validation metrics).
An unreadable one gives way to the newest (next best) readable one with one warning,
or raises with on_corrupt='fail'; one of another configuration always raises; nothing
is deleted. Rules: docs/training.md "Checkpoints".
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from typing import Any

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from bihier_jax import models
from bihier_jax.data.batch import Batch
from bihier_jax.training import train_state

SELECT_MODES = ("max", "min")  # task.select_mode
ON_CORRUPT = ("fallback", "fail")  # train.on_corrupt_checkpoint
UNREADABLE_DIR = "checkpoints_unreadable"  # under the workdir, beside checkpoints/


class CheckpointError(RuntimeError):
  """A checkpoint is missing or cannot be read; the message says which and why."""


class CheckpointMismatchError(CheckpointError):
  """A checkpoint's saved tree differs from the state to restore (another config)."""


class _DrainingEventLoop(asyncio.SelectorEventLoop):
  """An event loop that, when closed, first waits for the tasks still running on it.

  Orbax runs a restore in a fresh loop and gathers one read per array; when one read
  fails the gather returns at once and Orbax closes the loop while the other reads are
  in flight in TensorStore, whose callbacks then hit the closed loop ("Event loop is
  closed", tasks destroyed pending, coroutines never awaited). Waiting ends them cleanly.
  """

  def close(self):
    if not self.is_closed() and not self.is_running():
      pending = [t for t in asyncio.all_tasks(self) if not t.done()]
      if pending:
        self.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    super().close()


class _DrainingPolicy(asyncio.DefaultEventLoopPolicy):
  _loop_factory = _DrainingEventLoop


@contextlib.contextmanager
def _draining_event_loops():
  """New event loops (Orbax's, during a restore) finish their tasks before closing."""
  previous = asyncio.get_event_loop_policy()
  asyncio.set_event_loop_policy(_DrainingPolicy())
  try:
    yield
  finally:
    asyncio.set_event_loop_policy(previous)


def _short_reason(error: BaseException) -> str:
  """The first line of an Orbax/TensorStore error, without its TensorStore spec dump."""
  text = str(error).strip().splitlines()[0] if str(error).strip() else ""
  text = re.sub(r"\s*\[tensorstore_spec.*$", "", text)
  if len(text) > 300:
    text = text[:297] + "..."
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _leaf_path(path) -> str:
  keys = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        keys.append(str(getattr(k, attr)))
        break
    else:
      keys.append(str(k))
  return "/".join(keys)


def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """Array leaves of `tree` (arrays, ShapeDtypeStructs or Orbax metadata) by path."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_leaf_path(path): tuple(leaf.shape) for path, leaf in leaves
          if getattr(leaf, "shape", None) is not None}


def tree_difference(saved: Any, wanted: Any) -> str | None:
  """None if both trees have the same array leaves and shapes, else the first
  difference and how many there are, in one line."""
  have, want = _leaf_shapes(saved), _leaf_shapes(wanted)
  problems = [(p, f"{p} is in the checkpoint but not in this configuration")
              for p in set(have) - set(want)]
  problems += [(p, f"{p} is missing from the checkpoint") for p in set(want) - set(have)]
  problems += [(p, f"{p} has shape {have[p]} in the checkpoint, {want[p]} here")
               for p in set(have) & set(want) if have[p] != want[p]]
  if not problems:
    return None
  # A parameter says more about the cause than the optimizer moments that follow it.
  problems.sort(key=lambda item: (not item[0].startswith("params/"), item[0]))
  more = f" (and {len(problems) - 1} more differences)" if len(problems) > 1 else ""
  return problems[0][1] + more


def _finite_metric(select_metric: str, sign: float):
  def get(metrics: dict[str, Any]) -> float:
    value = float(metrics.get(select_metric, np.nan))
    # NaN never wins: rank it below every real value.
    return sign * value if np.isfinite(value) else -np.inf
  return get


class Checkpointer:
  """Saves and restores `TrainState`s under `workdir/checkpoints`.

  Args:
    workdir: the run's directory.
    keep: latest checkpoints kept (besides the best).
    select_metric: metric (a key of the metrics passed to `save`) ranking checkpoints.
    select_mode: 'max' or 'min'.
    read_only: open an existing directory without creating or deleting anything.
  """

  def __init__(self, workdir: str, *, keep: int = 3, select_metric: str = "loss",
               select_mode: str = "max", read_only: bool = False):
    if select_mode not in SELECT_MODES:
      raise ValueError(f"select_mode must be {' | '.join(SELECT_MODES)}, got "
                       f"{select_mode!r}")
    self.workdir = os.path.abspath(os.path.expanduser(workdir))
    self.directory = os.path.join(self.workdir, "checkpoints")
    self.unreadable: dict[int, str] = {}  # step -> why, found by restore
    if read_only and not os.path.isdir(self.directory):
      raise CheckpointError(
          f"no checkpoint directory {self.directory}: train first "
          f"(python -m bihier_jax.train --workdir {workdir})")
    self.select_metric = select_metric
    self._select_mode = select_mode
    sign = 1.0 if select_mode == "max" else -1.0
    best = _finite_metric(select_metric, sign)
    policy = pp.AnyPreservationPolicy([
        pp.LatestN(n=max(int(keep), 1)),
        pp.BestN(get_metric_fn=best, reverse=False, n=1,
                 keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=None if read_only else policy,
        best_fn=best, best_mode="max", create=not read_only, read_only=read_only,
        save_interval_steps=0 if read_only else 1, enable_async_checkpointing=True)
    # Handlers named up front: item_metadata can read a step before any restore.
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "input": ocp.JsonCheckpointHandler()})

  @classmethod
  def for_run(cls, config, workdir: str, *, read_only: bool = False) -> "Checkpointer":
    """The checkpointer of a run: `train.keep_checkpoints`, `task.select_metric` and
    `task.select_mode` of its config (`keep` has no effect read-only)."""
    return cls(workdir, keep=config.train.keep_checkpoints,
               select_metric=config.task.select_metric,
               select_mode=config.task.select_mode, read_only=read_only)

  # --- queries ---------------------------------------------------------------------------

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """Step with the best validation metric (None if no checkpoint has a finite one); a
    tie goes to the later step (`ranked_steps`, the one rule for training, eval and
    the tests)."""
    ranked = self.ranked_steps()
    return ranked[0] if ranked else None

  def ranked_steps(self) -> list[int]:
    """Steps with a finite validation metric, best first (a tie: the later step first)."""
    sign = 1.0 if self._select_mode == "max" else -1.0
    scored = []
    for step in self.all_steps():
      value = float((self.metrics(step) or {}).get(self.select_metric, np.nan))
      if np.isfinite(value):
        scored.append((sign * value, step))
    return [step for _, step in sorted(scored, reverse=True)]

  def metrics(self, step: int) -> dict[str, float] | None:
    """The validation metrics saved with `step` (None if it was saved without)."""
    if step not in self._manager.all_steps():
      return None
    metrics = self._manager.metrics(step)
    return dict(metrics) if metrics else None

  def checkpoint_time(self, step: int) -> float:
    """When `step` was written: the newest file modification time in it (POSIX s)."""
    newest = 0.0
    for root, _, files in os.walk(os.path.join(self.directory, str(step))):
      for name in files:
        newest = max(newest, os.path.getmtime(os.path.join(root, name)))
    return newest

  def resolve(self, which: int | str) -> int:
    """'latest' | 'best' | a step number -> an existing step, else CheckpointError."""
    steps = self.all_steps()
    if not steps:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    if which in ("latest", None, ""):
      return steps[-1]
    if which == "best":
      step = self.best_step()
      if step is None:
        raise CheckpointError(
            f"no checkpoint in {self.directory} has validation metrics "
            f"({self.select_metric}) to pick the best; available steps {steps}")
      return step
    try:
      step = int(which)
    except (TypeError, ValueError):
      raise CheckpointError(f"checkpoint must be 'latest', 'best' or a step number, "
                            f"got {which!r}") from None
    if step not in steps:
      raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; "
                            f"available steps {steps}")
    return step

  # --- save / restore --------------------------------------------------------------------

  def save(self, step: int, state: Any, input_position: dict[str, Any],
           metrics: dict[str, float] | None = None, *, force: bool = False,
           replace: bool = False) -> bool:
    """Starts an async save of `state` at `step` (metrics: validation results).

    replace: overwrite an existing checkpoint of `step` (to attach validation metrics
      to one saved without them); killed in between, the run resumes from the one before.
    """
    extra = {"input_position": input_position}
    clean = None
    if metrics:
      clean = {k: float(v) for k, v in metrics.items()
               if np.ndim(v) == 0 and isinstance(v, (int, float, np.floating,
                                                     np.integer))}
      extra["metrics"] = clean
    if step in self._manager.all_steps():
      if not replace:
        logging.info("checkpoint %d exists already", step)
        return False
      self._manager.wait_until_finished()
      self._manager.delete(step)
    saved = self._manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      input=ocp.args.JsonSave(extra)),
        metrics=clean, force=force)
    if saved:
      logging.info("saving checkpoint %d to %s", step, self.directory)
    return saved

  def restore(self, which: int | str, abstract_state: Any, *, on_corrupt: str = "fail",
              set_aside: bool = False) -> tuple[Any, dict[str, Any], int]:
    """Reads a checkpoint into the structure/shardings of `abstract_state`.

    Args:
      which: 'latest' | 'best' | step.
      abstract_state: a pytree of jax.ShapeDtypeStruct (with shardings) or arrays.
      on_corrupt: for 'latest' / 'best', what an unreadable checkpoint does: 'fallback'
        to the newest (next best) readable one, with one warning, or 'fail'. A step
        asked for by number never falls back.
      set_aside: move the unreadable steps passed over to WORKDIR/checkpoints_unreadable/
        (kept, not deleted), so that a training run can write those steps again.

    Returns:
      (state, extra JSON dict with 'input_position' and maybe 'metrics', step).

    Raises:
      CheckpointMismatchError: the checkpoint holds another model/optimizer structure.
      CheckpointError: missing, or unreadable (truncated, garbled, ...).
    """
    if on_corrupt not in ON_CORRUPT:
      raise ValueError(f"on_corrupt must be {' | '.join(ON_CORRUPT)}, got {on_corrupt!r}")
    first = self.resolve(which)
    named = which in ("latest", "best", None, "")
    if not named or on_corrupt == "fail":
      candidates = [first]
    elif which == "best":
      candidates = [first] + [s for s in self.ranked_steps() if s != first]
    else:
      candidates = sorted(self.all_steps(), reverse=True)
    bad = []
    for step in candidates:
      try:
        state, extra = self._restore_step(step, abstract_state)
      except CheckpointMismatchError:
        raise
      except CheckpointError as e:
        bad.append(step)
        self.unreadable[step] = str(e)
        continue
      if bad:
        kind = "next best" if which == "best" else "newest"
        on_disk = ", ".join(map(str, self.all_steps()))
        names = ", ".join(map(str, bad))
        kept = (f"{names} moved to {self._set_aside(bad)}, nothing deleted" if set_aside
                else f"{names} left as it is")
        logging.warning(
            "checkpoint step %s in %s cannot be read (%s): using step %d, the %s readable "
            "one; steps on disk: %s; %s (train.on_corrupt_checkpoint=fail stops instead)",
            names, self.directory, self.unreadable[bad[0]], step, kind, on_disk, kept)
      return state, extra, step
    steps = ", ".join(map(str, self.all_steps()))
    if len(bad) == 1:
      hint = ("; train.on_corrupt_checkpoint=fallback uses the newest readable one"
              if named and on_corrupt == "fail" else "")
      raise CheckpointError(
          f"checkpoint step {bad[0]} in {self.directory} cannot be read "
          f"({self.unreadable[bad[0]]}); it may be truncated or corrupt; steps on disk: "
          f"{steps}{hint}")
    raise CheckpointError(
        f"no readable checkpoint among steps {', '.join(map(str, bad))} in "
        f"{self.directory} ({self.unreadable[bad[0]]}); steps on disk: {steps}")

  def _restore_step(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    # Both the metadata and the arrays are read through TensorStore in Orbax's loops.
    with _draining_event_loops():
      try:
        saved = self._manager.item_metadata(step).state
      except Exception as e:  # orbax/tensorstore raise many types; one message for users
        raise CheckpointError(_short_reason(e)) from e
      if saved is None:
        raise CheckpointError("no readable state metadata")
      difference = tree_difference(saved, abstract_state)
      if difference:
        raise CheckpointMismatchError(
            f"checkpoint step {step} in {self.directory} was written by a different "
            f"model/optimizer configuration: {difference}; start a new workdir, or run "
            f"the code version and config that wrote it")
      try:
        restored = self._manager.restore(
            step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                input=ocp.args.JsonRestore()))
      except Exception as e:  # orbax/tensorstore raise many types; one message for users
        raise CheckpointError(_short_reason(e)) from e
    return restored.state, dict(restored.input or {})

  def _set_aside(self, steps) -> str:
    """Moves `steps` to WORKDIR/checkpoints_unreadable/; returns that folder."""
    target = os.path.join(self.workdir, UNREADABLE_DIR)
    if jax.process_index() == 0:
      os.makedirs(target, exist_ok=True)
      for step in sorted(steps):
        destination, n = os.path.join(target, str(step)), 1
        while os.path.exists(destination):
          destination, n = os.path.join(target, f"{step}.{n}"), n + 1
        os.replace(os.path.join(self.directory, str(step)), destination)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("unreadable checkpoints set aside")
    self._manager.reload()
    return target

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def reached_preemption(self, step: int) -> bool:
    """Multi-host preemption notice agreed by all hosts (false on single host)."""
    return bool(self._manager.reached_preemption(step))


def checkpoint_name(config, workdir: str, which: str) -> str:
  """What `which` names: '' -> 'best' if any checkpoint has a finite validation metric,
  else 'latest'; anything else as given ('best' | 'latest' | a step number)."""
  if which:
    return str(which)
  with Checkpointer.for_run(config, workdir, read_only=True) as ckpt:
    best = ckpt.best_step()
  return "best" if best is not None else "latest"


def restore_params(config, workdir: str, which: str, sample_batch: Batch,
                   mesh: jax.sharding.Mesh):
  """(model, params, step) of a run's checkpoint.

  Args:
    which: 'best' | 'latest' | a step number | '' (best if any checkpoint has
      validation metrics, else latest). An unreadable 'best' / 'latest' gives way to
      the next best / newest readable one, with a warning (train.on_corrupt_checkpoint
      = fail raises instead); nothing is moved or deleted.

  Raises:
    CheckpointError: no such checkpoint, or it cannot be read.
  """
  model = models.build_model(config)
  which = checkpoint_name(config, workdir, which)
  with Checkpointer.for_run(config, workdir, read_only=True) as ckpt:
    abstract = train_state.abstract_train_state(config, model, sample_batch, mesh)
    state, _, step = ckpt.restore(
        which, abstract, on_corrupt=config.train.get("on_corrupt_checkpoint", "fallback"))
  return model, state.params, step
