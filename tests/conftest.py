"""Test-wide settings: CPU only, quiet TensorFlow, transformers without TensorFlow, one
persistent XLA compilation cache for the whole session; the fixtures tiny_config and
small_batch (from bihier_jax.testing)."""

import contextlib
import glob
import importlib.metadata
import importlib.util
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("USE_TF", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

# Compilation dominates the suite on CPU, and many tests compile the same tiny programs
# again: each train_and_evaluate call jits its steps anew (a miss in JAX's in-memory
# cache), every `python -m bihier_jax.train` subprocess starts empty, and both xdist
# workers build the same models. A cache hit is the executable XLA compiled from the
# same program with the same options (the key hashes both), so no result changes.
# The first process to import this file (the xdist controller, before it starts the
# workers) makes the directory; workers and subprocesses inherit it via os.environ.
# A directory given in the environment is used as it is, and kept.
_CACHE_DIR = "JAX_COMPILATION_CACHE_DIR"
_OWN_CACHE_DIR = None
if not os.environ.get(_CACHE_DIR):
  _OWN_CACHE_DIR = tempfile.mkdtemp(prefix="bihier-tests-xla-cache-")
  os.environ[_CACHE_DIR] = _OWN_CACHE_DIR
# Tiny test programs compile in well under JAX's default threshold of 1 s.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
if importlib.util.find_spec("filelock") is not None:
  # A size limit makes JAX read and write entries under a file lock, so one worker
  # never reads another's half-written entry.
  os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(16 << 30))

# XLA's optimisation passes are most of the compile time of the suite's tiny programs
# (about half of it), and compiling is most of the suite; the tests check values against
# independent references with tolerances, and the same computation unoptimised. Set in
# the environment, so `python -m bihier_jax...` subprocesses compile the same way.
# (Benchmarks and real runs keep XLA's default.)
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# Of what is left, XLA CPU's MLIR fusion emitters and copy insertion's region analysis
# take about half (jit of the tiny bihier model's gradient: 11.3 s -> 5.6 s, its init
# 13 s -> 10 s). The older loop emitters run the same fused HLO; values agree to float
# rounding. Flags of jaxlib 0.10 (setup.cfg pins it): XLA aborts on a flag it does not
# know, so another version keeps its defaults. test_host's allocator probe drops them.
FAST_COMPILE_XLA_FLAGS = ("--xla_cpu_use_fusion_emitters=false",
                          "--xla_cpu_copy_insertion_use_region_analysis=false")
if importlib.metadata.version("jaxlib").startswith("0.10."):
  _xla_flags = os.environ.get("XLA_FLAGS", "")
  for _flag in FAST_COMPILE_XLA_FLAGS:
    if _flag.split("=")[0] not in _xla_flags:  # a value set in the environment stays
      _xla_flags += " " + _flag
  os.environ["XLA_FLAGS"] = _xla_flags.strip()

# XLA CPU steps stop page-faulting their buffers in on every call: bihier_jax.common.host.
from bihier_jax.common import host  # pylint: disable=wrong-import-position

host.tune_malloc()


def pytest_unconfigure(config):
  del config
  if _OWN_CACHE_DIR is not None:
    shutil.rmtree(_OWN_CACHE_DIR, ignore_errors=True)


# The slowest test modules, longest first (seconds of each on the 2-core VM in a whole
# `-n 2` run, 2026-12-07): started first, so that the run ends on short modules on both
# xdist workers instead of one worker finishing a long module alone. pyproject.toml's
# addopts make xdist send whole modules (`--dist loadfile`, no module fixture built on
# both workers) in this order (`--no-loadscope-reorder`); the other modules follow in
# collection order. Only the order changes: every module runs as before, its tests in
# their own order. Remeasure with `python -m pytest -n 2 tests --durations=0`.
SLOW_MODULES_FIRST = (
    "training/test_multihost.py",  # 265 s: three launches of 1 or 2 JAX processes
    "training/test_fsdp.py",  # 140 s; needs no demo records (the module above builds them)
    "training/test_train.py",  # 225 s
    "data_pipelines/test_tasks_end_to_end.py",  # 105 s
    "models/test_trainable.py",  # 95 s
    "cli/test_first_run.py",  # 80 s
    "models/test_bihier.py",  # 75 s
    "data_pipelines/test_custom_data.py",  # 60 s
    "models/test_bf16.py",  # 55 s
    "training/test_predict.py",  # 50 s
    "models/test_fusion.py",  # 50 s
    "data/test_pipeline.py",  # 50 s
    "models/test_stream_balance.py",  # 45 s
    "models/test_pronet.py",  # 45 s
    "models/test_lora.py",  # 40 s
    "training/test_parallel.py",  # 35 s
    "training/test_pallas_steps.py",  # 35 s
    "data/test_shuffle.py",  # 30 s
    "models/test_packed_esm.py",  # 25 s
    "cli/test_cli_errors.py",  # 25 s
    "models/test_esm2.py",  # 15 s
    "models/test_attention.py",  # 15 s
)
_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(session, config, items):
  """Moves the modules of SLOW_MODULES_FIRST to the front, in that order (stable)."""
  del session, config
  rank = {name: i for i, name in enumerate(SLOW_MODULES_FIRST)}

  def key(item):
    module = os.path.relpath(str(item.path), _TESTS_DIR).replace(os.sep, "/")
    return rank.get(module, len(rank))

  items.sort(key=key)  # stable: each module's tests keep their order


@contextlib.contextmanager
def built_once(tmp_path_factory, name: str):
  """A directory every xdist worker of this session shares, built by the first to ask.

  with built_once(tmp_path_factory, "demo") as (path, ready):
    if not ready:
      ...  # build into `path` (the others wait on a file lock meanwhile)

  Without xdist it is a fresh directory of this session. A failed build leaves no
  "ready" mark, so the next worker to ask builds it again (and fails the same way).
  """
  import filelock  # pylint: disable=g-import-not-at-top
  base = tmp_path_factory.getbasetemp()
  # Under xdist each worker's basetemp is <session>/popen-gwN: share the session's.
  root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
  path, mark = root / name, root / f"{name}.ready"
  with filelock.FileLock(str(root / f"{name}.lock")):
    path.mkdir(exist_ok=True)
    ready = mark.exists()
    yield path, ready
    mark.touch()


def garble_checkpoint(workdir, step: int) -> None:
  """Truncates every array file of one checkpoint under WORKDIR/checkpoints (a partial
  copy, a bad disk); its metadata stays readable."""
  for path in glob.glob(os.path.join(str(workdir), "checkpoints", str(step), "state", "**"),
                        recursive=True):
    if os.path.isfile(path) and "METADATA" not in os.path.basename(path).upper():
      with open(path, "r+b") as f:
        f.truncate(3)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
  """The demo records, built once for the session by the builder configs/demo.py names
  (as train does on first use)."""
  from bihier_jax.training import runtime  # pylint: disable=g-import-not-at-top
  from configs import demo  # pylint: disable=g-import-not-at-top
  with built_once(tmp_path_factory, "train_demo_data") as (root, ready):
    out = str(root / "demo")
    if not ready:
      config = demo.get_config("tiny")
      config.data.dir = out
      runtime.build_data(config)
  assert runtime.has_records(out)
  return out


@pytest.fixture
def tiny_config():
  """A fresh configs.default config with the test model of `testing.tiny_config`."""
  from bihier_jax import testing  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top
  return testing.tiny_config(default.get_config())


@pytest.fixture(scope="session")
def small_batch():
  """numpy `Batch` of `testing.small_examples()`: 4 graph slots, nodes padded to 8."""
  from bihier_jax import testing  # pylint: disable=g-import-not-at-top
  return testing.batch_of(testing.small_examples(), n_graph=4, node_multiple=8)
