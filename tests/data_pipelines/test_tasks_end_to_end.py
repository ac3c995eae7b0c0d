"""Each benchmark end to end on its native-format fixture: download layout -> preprocess
CLI (task registry, shard writer, manifest) -> a few tiny training steps -> evaluation.

Budget: preprocessing a task takes a few seconds of CPU, done the first time a test
asks for it. Each tiny training run compiles its train and eval programs with XLA's
optimisation passes off (most of their compile time; nothing here depends on the
numbers they produce), and builds its tf.data pipelines (about as long again). Two runs
are made by default, covering both head kinds: lba30 (graph regression with ligand-atom
nodes) and ppbs (per-residue weighted binary with per-subset metrics).
BIHIER_E2E_ALL_TASKS=1 trains and evaluates all six.
"""

import glob
import importlib
import json
import os

import jax
import numpy as np
import pytest

from fixtures import builders

TASKS = ("react", "mqa", "lba30", "lba60", "ppbs", "bce")
TRAINED_BY_DEFAULT = ("lba30", "ppbs")


def _write_raw(task, root):
  tmp = os.path.join(root, "tmp")
  if task == "react":
    builders.write_react(root)
  elif task == "mqa":
    pytest.importorskip("atom3d")
    builders.write_psr(root, tmp)
  elif task in ("lba30", "lba60"):
    pytest.importorskip("atom3d")
    builders.write_lba(root, tmp, identity=int(task[3:]))
  elif task == "ppbs":
    builders.write_ppbs(root)
  else:
    builders.write_bce(root)


def _preprocess(task, raw, out, *extra):
  from data_pipelines import preprocess
  return preprocess.main([task, "--raw", raw, "--out", out, "--workers", "1",
                          "--no-progress", "--max-neighbors", "8", *extra])


class _Prepared(dict):
  """task -> (records dir, metadata), each task preprocessed when first asked for: an
  xdist worker that runs one task's tests does not preprocess the other five."""

  def __init__(self, tmp_path_factory):
    super().__init__()
    self._tmp_path_factory = tmp_path_factory

  def __missing__(self, task):
    root = str(self._tmp_path_factory.mktemp(task))
    raw = os.path.join(root, "raw")
    os.makedirs(raw)
    _write_raw(task, raw)
    # Fold 4 (1ubi_A) is the held-out test fold; 1osm_A is the val example (the other
    # folds' groups: 1a28_AB#1+#2 one entry, 1hvr_B+4e43_A one antigen, 1osm_A).
    extra = ("--holdout-fold", "4") if task == "bce" else ()
    records = os.path.join(root, "records")
    self[task] = (records, _preprocess(task, raw, records, *extra))
    return self[task]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """task -> (records dir, metadata); each task built once for the module."""
  return _Prepared(tmp_path_factory)


@pytest.fixture
def fast_compiles():
  """XLA's CPU optimisation passes are most of a tiny run's compile time; what the
  training test checks (every stage runs and reports) does not depend on them."""
  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", before)


EXPECTED = {  # split -> (examples, skipped) of each fixture
    "react": {"train": (4, 0), "val": (1, 0), "test": (1, 1)},
    "mqa": {"train": (3, 0), "val": (2, 0), "test": (3, 0)},
    "lba30": {"train": (2, 0), "val": (1, 0), "test": (2, 0)},
    "lba60": {"train": (2, 0), "val": (1, 0), "test": (2, 0)},
    "ppbs": {"train": (2, 0), "val": (1, 0), "test": (1, 1)},
    "bce": {"train": (4, 0), "val": (1, 0), "test": (1, 0)},
}


@pytest.mark.parametrize("task", TASKS)
def test_preprocess_counts_and_records(prepared, task):
  from bihier_jax.data import records
  records_dir, metadata = prepared[task]
  splits = metadata["splits"]
  for split, (n, skipped) in EXPECTED[task].items():
    assert (splits[split]["examples"], splits[split]["skipped"]) == (n, skipped), split
  # Records read back to the same labels the task produced.
  for split in splits:
    files = sorted(glob.glob(os.path.join(records_dir, split, "*.tfrecord")))
    examples = [ex for path in files for ex in records.read_records(path)]
    assert len(examples) == splits[split]["examples"]
    for ex in examples:
      if task == "react":
        assert 0 <= ex.graph_label < 384
      if task in ("ppbs", "bce"):
        assert ex.node_label_mask.any() and set(np.unique(ex.node_labels)) <= {0.0, 1.0}
      if task.startswith("lba"):
        assert len(ex.ligand_elements) > 0


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_tiny_training_and_evaluation(prepared, task, tmp_path, fast_compiles):
  if task not in TRAINED_BY_DEFAULT and not os.environ.get("BIHIER_E2E_ALL_TASKS"):
    pytest.skip("a tiny run per task; set BIHIER_E2E_ALL_TASKS=1 to run")
  from bihier_jax.training import train_lib
  records_dir, _ = prepared[task]
  config = importlib.import_module(f"configs.{task}").get_config("tiny")
  config.data.dir = records_dir
  results = train_lib.train_and_evaluate(config, str(tmp_path / "work"))
  assert set(config.data.eval_splits) <= set(results)
  for split in config.data.eval_splits:
    value = results[split][config.task.select_metric]
    assert value is not None
  if task == "ppbs":
    assert any(k.startswith("auprc/") for k in results["val"])
  files = os.listdir(tmp_path / "work")
  assert any(f.endswith(".json") for f in files), files


def test_tfds_builder_per_task(prepared, tmp_path):
  import tensorflow_datasets as tfds
  from bihier_jax.data import tfds_builder  # noqa: F401  (registers the builder)
  from data_pipelines import mqa
  records_dir, metadata = prepared["mqa"]
  ds, info = tfds.load("bihier_records", split="test", data_dir=str(tmp_path / "tfds"),
                       builder_kwargs={"records_dir": records_dir, "task": "mqa"},
                       with_info=True)
  assert info.description == mqa.MQA.description
  got = sorted((x["id"].decode(), float(x["graph_label"])) for x in tfds.as_numpy(ds))
  assert len(got) == metadata["splits"]["test"]["examples"] == 3
  assert sorted(g for _, g in got) == pytest.approx([0.2, 0.55, 0.95])
  with pytest.raises(ValueError, match="records of task 'mqa', not 'react'"):
    tfds.load("bihier_records", split="test", data_dir=str(tmp_path / "tfds2"),
              builder_kwargs={"records_dir": records_dir, "task": "react"})
