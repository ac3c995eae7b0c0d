"""What every bench script shares: the environment, timing, alternating rounds, output.

  sys.path.insert(0, REPO); from bench import common; common.setup()  # before jax

setup(jax_platforms, threads), timed(fn, repeats, warmup), alternating_rounds(fns,
rounds), median_ratio, run_info(), write_json(path, results), print_table(rows, columns). Lengths of PDB-like
chains come from bihier_jax.testing.pdb_like_lengths.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Callable, Mapping, Sequence


def setup(jax_platforms: str | None = None, threads: int | None = None) -> None:
  """Quiet TensorFlow (and transformers without it), glibc malloc tuned; call before
  jax or TensorFlow start. threads=1 makes XLA's CPU backend single-threaded (its thread
  pool is fixed at start), for comparisons robust to a loaded machine."""
  os.environ.setdefault("USE_TF", "0")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  if jax_platforms:
    os.environ.setdefault("JAX_PLATFORMS", jax_platforms)
  if threads == 1:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_cpu_multi_thread_eigen=false"
                               " intra_op_parallelism_threads=1")
  from bihier_jax.common import host  # pylint: disable=import-outside-toplevel
  host.tune_malloc()  # before JAX or TensorFlow start threads: see bihier_jax.common.host


def timed(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
  """Median seconds per call; fn must block until its result is ready."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def alternating_rounds(fns: Mapping[str, Callable[[], object]],
                       rounds: int) -> dict[str, list[float]]:
  """Seconds of one call of each fn per round, the fns in turn: on a shared machine the
  load changes over minutes, so ratios of one round compare runs seconds apart."""
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      times[name].append(timed(fn, 1, warmup=0))
  return times


def median_ratio(times: Mapping[str, Sequence[float]], a: str, b: str) -> float:
  """Median over rounds of times[a] / times[b] (`alternating_rounds`)."""
  return statistics.median(x / y for x, y in zip(times[a], times[b]))


def run_info() -> dict:
  """The backend, device kinds and jax version a result was measured with."""
  import jax  # pylint: disable=import-outside-toplevel
  return {"backend": jax.default_backend(),
          "devices": [d.device_kind for d in jax.devices()], "jax": jax.__version__}


def write_json(path: str | None, results: object, indent: int = 1) -> None:
  """results as JSON at `path` (run_all.py reads it); nothing when path is empty."""
  if path:
    with open(path, "w") as f:
      json.dump(results, f, indent=indent)


def print_table(rows: Sequence[Mapping], columns: Sequence[str]) -> None:
  """rows as aligned text columns; floats to 4 significant digits."""
  def fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)
  cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
  widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
  print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
  for row in cells:
    print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
