"""Orbax checkpoints of a training run: keep the last N and the best by a metric.

One checkpoint (DIR/checkpoints/<step>/) holds two items:
- `state`: the whole `TrainState` pytree (parameters, optimizer state, step, RNG key,
  non-finite counters), written with `StandardSave` (async, atomic: a step directory
  appears only once complete, so a run killed mid-save leaves the previous ones intact);
- `input`: JSON with the input position (`parallel.InputPosition`) and, after an
  evaluation, the validation metrics.
Checkpoints with validation metrics compete for "best" (`task.select_metric`,
`task.select_mode`; a tie goes to the later step, and a checkpoint whose select metric
is missing or NaN is never best); the policy keeps the `keep` latest plus the single
best, so the best survives any number of later saves until a better one replaces it.
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp


class CheckpointError(RuntimeError):
  """A checkpoint is missing or cannot be read; the message says which and why."""


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
    if select_mode not in ("max", "min"):
      raise ValueError(f"select_mode must be max | min, got {select_mode!r}")
    self.directory = os.path.join(os.path.abspath(os.path.expanduser(workdir)),
                                  "checkpoints")
    if read_only and not os.path.isdir(self.directory):
      raise CheckpointError(
          f"no checkpoint directory {self.directory}: train first "
          f"(python -m bihier_jax.train --workdir {workdir})")
    self.select_metric = select_metric
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
        enable_async_checkpointing=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "input"))

  # --- queries ---------------------------------------------------------------------------

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """Step with the best validation metric (None if no checkpoint has a finite one)."""
    step = self._manager.best_step()
    if step is None:
      return None
    value = (self.metrics(step) or {}).get(self.select_metric, np.nan)
    return step if np.isfinite(value) else None

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

  def restore(self, which: int | str, abstract_state: Any
              ) -> tuple[Any, dict[str, Any], int]:
    """Reads a checkpoint into the structure/shardings of `abstract_state`.

    Args:
      which: 'latest' | 'best' | step.
      abstract_state: a pytree of jax.ShapeDtypeStruct (with shardings) or arrays.

    Returns:
      (state, extra JSON dict with 'input_position' and maybe 'metrics', step).

    Raises:
      CheckpointError: missing, or unreadable (truncated, wrong model config, ...).
    """
    step = self.resolve(which)
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                        input=ocp.args.JsonRestore()))
    except Exception as e:  # orbax/tensorstore raise many types; one message for users
      raise CheckpointError(
          f"checkpoint step {step} in {self.directory} cannot be read "
          f"({type(e).__name__}: {str(e)[:500]}); it may be corrupt or written by a "
          f"different model config") from e
    return restored.state, dict(restored.input or {}), step

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

  def reached_preemption(self, step: int) -> bool:
    """Multi-host preemption notice agreed by all hosts (false on single host)."""
    return bool(self._manager.reached_preemption(step))
