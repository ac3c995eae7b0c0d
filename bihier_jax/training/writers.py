"""Where a run's numbers go: metric writers, the parameter table, matmul throughput.

Public: JsonlWriter (DIR/metrics.jsonl, the training-curve source), make_writer (log,
TensorBoard and JSONL), write_parameter_overview (DIR/parameters.txt), flat_config
(hyperparameters for TensorBoard), MatmulThroughput (achieved TFLOP/s per device).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from absl import logging
from clu import metric_writers
from clu import parameter_overview
import jax
import numpy as np


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


def flat_config(d: dict, prefix: str = "") -> dict[str, Any]:
  """A nested config dict as {'group.field': scalar} (other values as strings)."""
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(flat_config(v, key + "."))
    else:
      out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
  return out
