"""Process start-up and stop of a run: the JAX backend, the data a config builds, signals.

Public: start_backend (joins the multi-host job when asked, starts JAX, logs the
backend once), build_data (runs the builder a config names in `data.builder` when
`data.dir` has no records), StopSignal (SIGTERM / SIGINT -> save and stop).
Rules: docs/training.md "Faults" and docs/parallelism.md "Multi-host".
"""

from __future__ import annotations

import importlib
import os
import signal
import sys

from absl import logging
import jax
import ml_collections

from bihier_jax.common import storage


class StartupError(ValueError):
  """A run cannot start as configured; the message is one line that says what to do."""


_BACKEND_LOGGED = []  # the backend line is logged once per process


def start_backend(multi_host: bool) -> None:
  """Joins the multi-process job when `multi_host` (train.multi_host), once, then starts
  JAX and logs its backend and devices.

  The coordinator, the process count and this process's rank come from the launcher's
  environment, which `jax.distributed.initialize()` reads: a Cloud TPU VM, SLURM
  (`launch.slurm_gpu`, and `launch.local` on one machine), Open MPI, or
  JAX_COORDINATOR_ADDRESS with one of those.

  Raises:
    StartupError: no launcher environment (a run alone, e.g. evaluating a pod run's
      workdir on one machine, needs --config.train.multi_host=False).
  """
  if multi_host and not jax.distributed.is_initialized():
    try:
      jax.distributed.initialize()
    except ValueError as e:
      raise StartupError(
          f"train.multi_host=True but this process was not started as part of a "
          f"multi-process job ({e}): start it with python -m launch.local, SLURM or on "
          f"a TPU VM slice, or pass --config.train.multi_host=False to run it alone"
      ) from e
    logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
  if _BACKEND_LOGGED:
    return
  _BACKEND_LOGGED.append(True)
  kinds = sorted({d.device_kind for d in jax.devices()})
  logging.info("JAX backend %s: %d device(s) (%s), %d process(es), %d device(s) on "
               "this one", jax.default_backend().upper(), jax.device_count(),
               ", ".join(kinds), jax.process_count(), jax.local_device_count())


def has_records(directory: str) -> bool:
  return storage.exists(storage.join(directory, "metadata.json"))


def build_data(config: ml_collections.ConfigDict) -> None:
  """Builds config.data.dir's records with the builder the config names, if missing.

  `data.builder` is 'module:function' (configs/demo.py names the demo's); the function
  takes the directory. The config names it, so the library imports no application.
  """
  builder = str(config.data.get("builder", "") or "")
  directory = storage.absolute(config.data.dir)
  if not builder or has_records(directory):
    return
  if jax.process_index() == 0:
    logging.warning("records not found in %s: building them now with %s", directory,
                    builder)
    module, _, function = builder.partition(":")
    getattr(importlib.import_module(module), function)(directory)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("data built")


class StopSignal:
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
