"""Training end to end on the demo (`configs/demo.py:tiny`, a few steps).

- train (CLI, with --config overrides) -> eval (best checkpoint) -> predict (a PDB file);
  real proteins per step logged as the pipeline's batches hold them;
- the reported results are the checkpoint selected on validation (an earlier step
  here), equal to a separate evaluation of that step, the test split unseen before;
  a restart reports it again; without validation the last step, named so;
- a run SIGKILLed mid-way and restarted logs exactly the losses of the uninterrupted
  run; SIGTERM then stops it cleanly with a checkpoint of its last step;
- non-finite losses skip updates, and too many in a row stop with a clear error while the
  last checkpoint keeps finite parameters;
- a missing or corrupt checkpoint gives a clear error.

Subprocesses share the session's persistent XLA compilation cache (conftest) with both
xdist workers and the in-process tests, so only the first run compiles. Budget: < 150 s on an idle 2-core machine for the rest; the in-process
selection test compiles its own steps (4.6 min measured on the shared 2-core VM at load
average 4-5).
"""

import functools
import glob
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import conftest

from bihier_jax.data import layout
from bihier_jax.data import pipeline
from bihier_jax import testing
from bihier_jax.data.batch import PaddingBudget
from bihier_jax.training import checkpointing
from bihier_jax.training import mesh as mesh_lib
from bihier_jax import models
from bihier_jax.training import train_state
from bihier_jax.training import train_lib
from bihier_jax.training import writers
from configs import demo
from tests.paths import REPO


def _env():
  """The subprocesses' environment: the session's compilation cache (conftest), shared
  with both xdist workers and this process, every program kept."""
  return dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def _train_cmd(workdir, data_dir, *extra):
  return [sys.executable, "-m", "bihier_jax.train", "--config",
          os.path.join(REPO, "configs", "demo.py") + ":tiny", "--workdir", workdir,
          f"--config.data.dir={data_dir}", "--config.train.num_steps=8", *extra]


def _losses(workdir):
  """step -> [train/loss values logged at that step] (several after a restart)."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      if "train/loss" in row:
        out.setdefault(row["step"], []).append(row["train/loss"])
  return out


_REFERENCE_OVERRIDES = ("--config.train.eval_every=4",
                        "--config.train.checkpoint_every_epochs=0.25")


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, demo_data):
  """An uninterrupted tiny run through the CLI, with config overrides (one per session,
  shared by the xdist workers; the tests read it or copy it)."""
  with conftest.built_once(tmp_path_factory, "train_reference_run") as (root, ready):
    workdir = str(root)
    if not ready:
      # checkpoint_every_epochs: resolved into steps at the start (losses do not depend
      # on it).
      proc = subprocess.run(_train_cmd(workdir, demo_data, *_REFERENCE_OVERRIDES),
                            cwd=REPO, env=_env(), capture_output=True,
                            text=True, timeout=600)
      assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
      assert "RANDOM weights" in proc.stdout  # the loud warning
      assert "| accuracy |" in proc.stdout  # the final metrics table
      assert "real proteins per step on average" in proc.stdout
      with open(os.path.join(workdir, "stderr.txt"), "w") as f:
        f.write(proc.stderr)
  return workdir


def test_log_starts_with_the_backend_and_stays_quiet(reference_run):
  stderr = open(os.path.join(reference_run, "stderr.txt")).read()
  log = [l for l in stderr.splitlines() if re.match(r"[IWEF]\d{4} ", l)]
  # This process sees the same backend (same environment, JAX_PLATFORMS=cpu).
  assert (f"] JAX backend {jax.default_backend().upper()}: {jax.device_count()} device(s)"
          in log[0]), log[:3]
  # The config and the parameter table are files, not log lines.
  assert "[Hyperparameters]" not in stderr and "shuffle_buffer_mb" not in stderr
  table = open(os.path.join(reference_run, "parameters.txt")).read()
  assert "Total:" in table and "gnn" in table
  assert "Total:" not in stderr
  assert "Traceback" not in stderr and "never awaited" not in stderr


def test_train_eval_predict(reference_run, demo_data):
  workdir = reference_run
  config = json.load(open(os.path.join(workdir, "config.json")))
  assert config["train"]["num_steps"] == 8 and config["train"]["eval_every"] == 4
  # The epoch field became steps (as recorded), from about one pass's real batches.
  steps_per_epoch = config["train"]["steps_per_epoch"]
  assert config["train"]["checkpoint_every"] == max(1, round(0.25 * steps_per_epoch))
  epoch_batches = sum(1 for _ in itertools.takewhile(
      lambda item: item[1]["epoch"] == 0, pipeline.make_dataset(
          demo_data, "train", demo.get_config("tiny"), training=True, seed=0,
          process_index=0, process_count=1)))
  assert abs(steps_per_epoch - epoch_batches) <= 0.25 * epoch_batches
  losses = _losses(workdir)
  assert sorted(losses) == list(range(1, 9))
  assert all(np.isfinite(v[0]) for v in losses.values())
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  tflops = {r["step"]: r["train/matmul_tflops_per_device"] for r in rows
            if "train/matmul_tflops_per_device" in r}
  # Every logged step but the first (compilation) reports a positive throughput.
  assert sorted(tflops) == list(range(2, 9))
  assert all(np.isfinite(v) and v > 0 for v in tflops.values())
  # Real proteins per step: the training batches' graph_mask (padding graph excluded)
  # counted here on the same stream (one device: one batch per step, in order).
  cfg = demo.get_config("tiny")
  stream = pipeline.make_dataset(demo_data, "train", cfg, training=True, seed=0,
                                       process_index=0, process_count=1)
  expected = [float(np.sum(b.graph_mask)) for b, _ in itertools.islice(stream, 8)]
  logged = {r["step"]: r["train/proteins_per_step"] for r in rows
            if "train/proteins_per_step" in r}
  assert [logged[s] for s in range(1, 9)] == expected
  assert all(1 <= n <= cfg.train.batch_size for n in expected)
  assert os.path.getsize(os.path.join(workdir, "train_curves.png")) > 1000
  # Reported: every split from the checkpoint selected on val accuracy; the test split
  # was evaluated once, for it.
  best = checkpointing.Checkpointer(workdir, read_only=True,
                                   select_metric="accuracy").best_step()
  assert best in (4, 8)
  reported = {split: json.load(open(os.path.join(workdir, "eval", f"{split}.json")))
              for split in ("val", "test")}
  assert {(r["checkpoint"], r["step"]) for r in reported.values()} == {("best", best)}
  val = reported["val"]
  assert 0.0 <= val["accuracy"] <= 1.0 and val["num_items"] > 100
  assert [r["step"] for r in rows if "test/accuracy" in r] == [best]
  assert [r["step"] for r in rows if "val/accuracy" in r] == [4, 8]
  assert "| accuracy |" in open(os.path.join(workdir, "eval", "metrics.md")).read()

  from bihier_jax.training import inference  # pylint: disable=g-import-not-at-top
  cfg.data.dir = demo_data
  cfg.train.num_steps = 8
  results = inference.evaluate_checkpoint(cfg, workdir, "best", ["test"])
  with open(os.path.join(workdir, "eval", "test.json")) as f:
    saved = json.load(f)
  assert saved["accuracy"] == pytest.approx(results["test"]["accuracy"])
  assert (saved["checkpoint"], saved["step"]) == ("best", best)
  assert saved["accuracy"] == pytest.approx(reported["test"]["accuracy"], rel=1e-6)
  from bihier_jax.training import pooling  # pylint: disable=g-import-not-at-top
  items = pooling.load_predictions(os.path.join(workdir, "eval", "test_predictions.npz"))
  assert pooling.recompute_metrics(items)["accuracy"] == saved["accuracy"]

  from data_pipelines import demo as demo_task  # pylint: disable=g-import-not-at-top
  pdb = os.path.join(demo_task.default_raw_dir(), "1eteA.pdb.gz")
  out = inference.predict_structure(cfg, workdir, pdb, out=os.path.join(workdir, "p.npz"))
  preds = np.load(out)
  n = preds["residue_type"].shape[0]
  assert n > 50
  assert preds["residue_predictions"].shape == (n, 3)
  np.testing.assert_allclose(preds["residue_predictions"].sum(-1), 1.0, atol=1e-5)
  assert preds["node_embeddings"].shape[0] == n
  assert preds["graph_embeddings"].shape[0] == 1
  assert preds["chain_id"].shape == preds["residue_number"].shape == (n,)


def _wait_for_step(workdir, step, proc, timeout=300):
  path = os.path.join(workdir, "metrics.jsonl")
  end = time.time() + timeout
  while time.time() < end:
    if proc.poll() is not None:
      return False
    if os.path.exists(path) and max(_losses(workdir) or [0]) >= step:
      return True
    time.sleep(0.05)
  return False


def test_resume_after_sigkill_and_sigterm(reference_run, demo_data, tmp_path):
  workdir = str(tmp_path / "faulty")
  cmd = _train_cmd(workdir, demo_data, "--config.train.eval_every=4")
  # 1) SIGKILL once a few steps are done.
  proc = subprocess.Popen(cmd, cwd=REPO, env=_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  assert _wait_for_step(workdir, 3, proc), "run ended before it could be killed"
  proc.send_signal(signal.SIGKILL)
  assert proc.wait() == -signal.SIGKILL
  # 2) Restart, then SIGTERM: a clean exit that leaves a checkpoint of its last step.
  before = max(_losses(workdir))
  proc = subprocess.Popen(cmd, cwd=REPO, env=_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  reached = _wait_for_step(workdir, before + 1, proc)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 0, stderr[-3000:]
  if reached:  # (SIGTERM after the last step just finishes the run)
    last_logged = max(_losses(workdir))
    ckpt = checkpointing.Checkpointer(workdir, read_only=True)
    assert ckpt.latest_step() == last_logged
    assert "SIGTERM" in stderr
  # Every loss logged by the killed and the resumed run equals the uninterrupted one.
  reference = _losses(reference_run)
  resumed = _losses(workdir)
  assert max(resumed) > before  # the restarted run made progress
  for step, values in resumed.items():
    np.testing.assert_allclose(values, reference[step][0], rtol=0, atol=1e-6,
                               err_msg=f"step {step}")


def _lines(stderr, text):
  return [line for line in stderr.splitlines() if text in line]


def test_unreadable_newest_checkpoint(reference_run, demo_data, tmp_path):
  """eval and train fall back to the newest readable checkpoint, with one warning line.
  Uses a copy of the reference run (no new training run from step 0)."""
  workdir = str(tmp_path / "copy")
  shutil.copytree(reference_run, workdir)
  ckpt = checkpointing.Checkpointer(workdir, read_only=True)
  on_disk = ckpt.all_steps()
  ckpt.close()
  newest, older = on_disk[-1], on_disk[-2]
  conftest.garble_checkpoint(workdir, newest)
  steps_text = ", ".join(map(str, on_disk))

  # eval (its config from the workdir's config.json): the newest readable one.
  proc = subprocess.run(
      [sys.executable, "-m", "bihier_jax.eval", "--workdir", workdir,
       "--checkpoint", "latest", "--splits", "val"],
      cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  [warning] = _lines(proc.stderr, "cannot be read")
  assert f"checkpoint step {newest} in " in warning and f"using step {older}" in warning
  assert f"steps on disk: {steps_text}" in warning
  assert json.load(open(os.path.join(workdir, "eval", "val.json")))["step"] == older

  # train.on_corrupt_checkpoint=fail is tested in-process (test_checkpointing).
  cmd = _train_cmd(workdir, demo_data, *_REFERENCE_OVERRIDES)

  # train, default: resumes from the older step, its own input position, and logs
  # exactly the uninterrupted run's losses again; the bad step is kept, moved aside.
  before = _losses(workdir)
  proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  [warning] = _lines(proc.stderr, "cannot be read")
  assert f"using step {older}" in warning and f"steps on disk: {steps_text}" in warning
  assert os.path.isdir(os.path.join(workdir, checkpointing.UNREADABLE_DIR, str(newest)))
  reference, after = _losses(reference_run), _losses(workdir)
  assert sorted(s for s in after if len(after[s]) > len(before.get(s, []))) == list(
      range(older + 1, 9))
  for step, values in after.items():
    np.testing.assert_allclose(values, reference[step][0], rtol=0, atol=1e-6,
                               err_msg=f"step {step}")
  ckpt = checkpointing.Checkpointer(workdir, read_only=True)
  assert ckpt.latest_step() == 8
  ckpt.close()
  # A checkpoint of another configuration: test_missing_and_corrupt_checkpoints.


# --- in-process: non-finite losses, checkpoint errors ------------------------------------

_BUDGET = PaddingBudget(n_node=41, n_edge=700, n_graph=3, n_row=2, row_length=26)
# make_dataset stand-ins: 2 evaluation batches; bad_from=k: NaN weights from batch k.
_synthetic_dataset = functools.partial(testing.synthetic_dataset, _BUDGET, eval_batches=2)


def test_nonfinite_steps_are_skipped_then_stop(tmp_path):
  config = demo.get_config("tiny")
  config.task.name = "synthetic"
  config.train.num_steps = 10
  config.train.checkpoint_every = 1
  config.train.keep_checkpoints = 10
  config.train.eval_every = 100
  config.train.max_consecutive_nonfinite = 3
  with pytest.raises(train_lib.NonFiniteLossError, match="3 consecutive steps"):
    train_lib.train_and_evaluate(config, str(tmp_path),
                                 dataset_fn=_synthetic_dataset(bad_from=2))
  ckpt = checkpointing.Checkpointer(str(tmp_path), read_only=True)
  steps = ckpt.all_steps()
  assert steps[-1] == 4  # steps 3, 4 skipped and saved; step 5 raised before saving
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
      ckpt._manager.item_metadata(4).state)  # pylint: disable=protected-access
  state4, _, _ = ckpt.restore(4, abstract)
  state2, _, _ = ckpt.restore(2, abstract)
  assert int(state4["nonfinite_total"]) == 2 and int(state4["nonfinite_streak"]) == 2
  for a, b in zip(jax.tree_util.tree_leaves(state4["params"]),
                  jax.tree_util.tree_leaves(state2["params"])):
    assert np.all(np.isfinite(a))
    np.testing.assert_array_equal(a, b)  # skipped updates left the parameters alone
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  counted = [r["train/nonfinite_steps"] for r in rows if "train/nonfinite_steps" in r]
  assert counted[:4] == [0, 0, 1, 2]


def _validation_peaks_first(dataset_fn, passes):
  """Wraps a dataset_fn: the first 'val' pass has every label 0, so the validation
  majority_accuracy (labels only) is 1.0 at the first evaluation and lower after it.
  Counts the evaluation passes per split in `passes`."""
  def wrapped(data_dir, split, config, *, training, **kw):
    stream = dataset_fn(data_dir, split, config, training=training, **kw)
    if training:
      return stream
    passes[split] = passes.get(split, 0) + 1
    if split != "val" or passes[split] > 1:
      return stream
    return ((b.replace(node_labels=np.zeros_like(b.node_labels)), m) for b, m in stream)
  return wrapped


def _selection_config():
  config = demo.get_config("tiny")
  config.task.name = "synthetic"
  config.task.select_metric = "majority_accuracy"
  config.train.num_steps = 6
  config.train.eval_every = 2
  config.train.checkpoint_every = 100
  config.train.keep_checkpoints = 1
  return config


def test_reports_the_checkpoint_selected_on_validation(tmp_path, capsys):
  workdir = str(tmp_path)
  config = _selection_config()
  passes = {}
  results = train_lib.train_and_evaluate(
      config, workdir, dataset_fn=_validation_peaks_first(_synthetic_dataset(), passes))
  # val at steps 2, 4, 6 (the final results reuse step 2's); test once, at the end.
  assert passes == {"val": 3, "test": 1}
  reported = {split: json.load(open(tmp_path / "eval" / f"{split}.json"))
              for split in ("val", "test")}
  assert {(r["checkpoint"], r["step"]) for r in reported.values()} == {("best", 2)}
  assert reported["val"]["majority_accuracy"] == 1.0
  assert reported["test"]["loss"] == pytest.approx(results["test"]["loss"])
  assert "Checkpoint best (step 2)" in open(tmp_path / "eval" / "metrics.md").read()
  # keep_checkpoints=1: the latest (6) plus the best (2); step 4 went.
  assert checkpointing.Checkpointer(workdir, read_only=True).all_steps() == [2, 6]
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows if "test/loss" in r] == [2]  # logged at the end only
  assert [r["step"] for r in rows if "val/loss" in r] == [2, 4, 6]

  # An independent evaluation of step 2's checkpoint gives the reported test metrics;
  # the last step's differ.
  from bihier_jax.training import inference  # pylint: disable=g-import-not-at-top
  at_2 = inference.evaluate_checkpoint(config, workdir, "2", ["test"],
                                       dataset_fn=_synthetic_dataset())["test"]
  last = inference.evaluate_checkpoint(config, workdir, "latest", ["test"],
                                       dataset_fn=_synthetic_dataset())["test"]
  assert json.load(open(tmp_path / "eval" / "test.json"))["checkpoint"] == "latest"
  for name in ("loss", "accuracy"):
    assert reported["test"][name] == pytest.approx(at_2[name], rel=1e-6), name
  assert reported["test"]["loss"] != pytest.approx(last["loss"], rel=1e-6)

  # The last checkpoint saved without validation metrics (a stop at the last step):
  # a restart scores it on val, saves it again with them, and reports step 2 again.
  ckpt = checkpointing.Checkpointer(workdir, keep=1, select_metric="majority_accuracy")
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
      ckpt._manager.item_metadata(6).state)  # pylint: disable=protected-access
  state6, extra6, _ = ckpt.restore(6, abstract)
  ckpt.save(6, state6, extra6["input_position"], None, replace=True)
  ckpt.wait()
  assert ckpt.metrics(6) is None
  ckpt.close()
  again = train_lib.train_and_evaluate(
      config, workdir, dataset_fn=_validation_peaks_first(_synthetic_dataset(), passes))
  ckpt = checkpointing.Checkpointer(workdir, read_only=True,
                                    select_metric="majority_accuracy")
  assert ckpt.metrics(6)["majority_accuracy"] < 1.0 and ckpt.best_step() == 2
  rerun = json.load(open(tmp_path / "eval" / "test.json"))
  assert (rerun["checkpoint"], rerun["step"]) == ("best", 2)
  assert again["test"]["loss"] == pytest.approx(reported["test"]["loss"], rel=1e-6)

  # Without a validation split nothing is selected: the last step, named as such.
  config.data.eval_splits = ("test",)
  capsys.readouterr()
  fallback = train_lib.train_and_evaluate(config, workdir, dataset_fn=_synthetic_dataset())
  saved = json.load(open(tmp_path / "eval" / "test.json"))
  assert (saved["checkpoint"], saved["step"]) == ("latest", 6)
  assert fallback["test"]["loss"] == pytest.approx(last["loss"], rel=1e-6)
  out = capsys.readouterr().out
  assert "checkpoint latest, step 6" in out and "LAST step" in out


# Orbax's reads of damaged arrays must all end before the restore returns (no coroutine
# left un-awaited on a closed event loop).
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_missing_and_corrupt_checkpoints(tmp_path):
  config = demo.get_config("tiny")
  config.task.name = "synthetic"
  mesh = mesh_lib.make_mesh(jax.devices()[:1])
  batch = layout.collate([testing.random_example(12, seed=0)], _BUDGET)
  with pytest.raises(checkpointing.CheckpointError, match="train first"):
    checkpointing.restore_params(config, str(tmp_path / "nothing"), "", batch, mesh)
  # A checkpoint of a different model (wider GNN) does not fit this config.
  other = demo.get_config("tiny")
  other.task.name = "synthetic"
  other.model.gnn.hidden = 24
  state, _ = train_state.create_train_state(other, models.build_model(other), batch,
                                          mesh)
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  ckpt.save(1, state, {"consumed": 1, "pending": []})
  ckpt.wait()
  ckpt.close()
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match=r"different model/optimizer configuration: params/\S+ has shape"):
    checkpointing.restore_params(config, str(tmp_path), "latest", batch, mesh)
  with pytest.raises(checkpointing.CheckpointError, match="available steps"):
    checkpointing.restore_params(other, str(tmp_path), "7", batch, mesh)
  # Damaged array files.
  for path in glob.glob(str(tmp_path / "checkpoints" / "1" / "state" / "**"),
                        recursive=True):
    if os.path.isfile(path) and "METADATA" not in path.upper():
      with open(path, "wb") as f:
        f.write(b"\0" * 7)
  with pytest.raises(checkpointing.CheckpointError, match="cannot be read"):
    checkpointing.restore_params(other, str(tmp_path), "latest", batch, mesh)


def test_matmul_throughput_counts_only_added_steps(monkeypatch):
  clock = iter([10.0, 12.0, 20.0, 30.0, 34.0])
  monkeypatch.setattr(writers.time, "perf_counter", lambda: next(clock))
  meter = writers.MatmulThroughput(num_devices=2)  # clock starts at t=10
  meter.add(8e12)
  meter.add(8e12)
  assert meter.read() == pytest.approx(16e12 / 2 / (12.0 - 10.0) / 1e12)  # t=12
  meter.pause()                     # t=20: evaluation between 12 and 20 not counted
  meter.add(4e12)
  assert meter.read() == pytest.approx(4e12 / 2 / (30.0 - 20.0) / 1e12)
  assert meter.read() is None       # no steps since the last reading


def test_schedules():
  from bihier_jax.training import optim  # pylint: disable=g-import-not-at-top
  config = demo.get_config()
  config.optim.learning_rate = 1.0
  config.optim.warmup_steps = 10
  config.train.num_steps = 110
  sched = optim.learning_rate_schedule(config)
  np.testing.assert_allclose([sched(0), sched(5), sched(10)], [0.0, 0.5, 1.0], atol=1e-6)
  np.testing.assert_allclose(sched(60), 0.5, atol=1e-6)  # cosine half way
  np.testing.assert_allclose(sched(110), 0.0, atol=1e-6)
  config.optim.schedule = "step"
  config.optim.step_every = 20
  config.optim.step_factor = 0.5
  sched = optim.learning_rate_schedule(config)
  np.testing.assert_allclose([sched(15), sched(35), sched(55)], [1.0, 0.5, 0.25])
