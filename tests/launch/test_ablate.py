"""Ablation sweeps: variant expansion, config flags, local runner, aggregation; which
results count (the selected checkpoint's, not stale) over real Orbax checkpoints.

Budget: < 20 s without the real tiny run; the real run (train CLI + demo config) is
skipped unless both exist, and is kept to a few steps.
"""

import csv
import json
import os
import shutil
import stat
import sys

import numpy as np
import pytest

from launch import ablate
from tests.paths import REPO


def test_fusion_depth_levels():
  assert ablate.fusion_depth_levels(4) == [(), (4,), (2, 4), (1, 2, 3, 4)]
  assert ablate.fusion_depth_levels(2) == [(), (2,), (1, 2)]
  assert ablate.fusion_depth_levels(1) == [(), (1,)]
  with pytest.raises(ValueError):
    ablate.fusion_depth_levels(0)


def test_sweep_variants_names_and_overrides():
  depth = ablate.sweep_variants("fusion_depth", 4)
  assert [v.name for v in depth] == ["levels_none", "levels_4", "levels_2-4",
                                     "levels_1-2-3-4"]
  assert [v.overrides for v in depth] == [
      (("model.kind", "parallel"), ("model.fusion.levels", "()")),
      (("model.kind", "bihier"), ("model.fusion.levels", "(4,)")),
      (("model.kind", "bihier"), ("model.fusion.levels", "(2,4)")),
      (("model.kind", "bihier"), ("model.fusion.levels", "(1,2,3,4)"))]
  assert [dict(v.overrides)["model.fusion.mode"]
          for v in ablate.sweep_variants("fusion_mode")] == ["local", "global"]
  assert [dict(v.overrides)["model.fusion.direction"]
          for v in ablate.sweep_variants("direction")] == ["bi", "seq2struct",
                                                           "struct2seq"]
  assert [dict(v.overrides)["model.kind"] for v in ablate.sweep_variants("baselines")
          ] == ["bihier", "esm_only", "gnn_only", "serial", "parallel", "cross"]
  assert [(v.name, v.overrides) for v in ablate.sweep_variants("comparison")] == [
      ("gnn_only", (("model.kind", "gnn_only"),)),
      ("parallel", (("model.kind", "parallel"),)),
      ("cross", (("model.kind", "cross"),)),
      ("bihier_local", (("model.kind", "bihier"), ("model.fusion.mode", "local"))),
      ("bihier_global", (("model.kind", "bihier"), ("model.fusion.mode", "global")))]
  with pytest.raises(ValueError, match="unknown sweep"):
    ablate.sweep_variants("depth")


def test_run_flags_parse_into_the_intended_config():
  # Independent check: ml_collections' own flag parser reads what the runner passes.
  from absl import flags
  from ml_collections import config_flags
  for variant in ablate.sweep_variants("fusion_depth", 4):
    run = ablate.plan_runs([variant], [3], "/w", "configs/default.py",
                           (("train.num_steps", "7"),))[0]
    argv = ["prog", f"--config={os.path.join(REPO, 'configs/default.py')}",
            *run.flags()]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=fv, sys_argv=argv)
    fv(argv)
    cfg = fv.config
    expected = {"levels_none": (), "levels_4": (4,), "levels_2-4": (2, 4),
                "levels_1-2-3-4": (1, 2, 3, 4)}[variant.name]
    assert tuple(cfg.model.fusion.levels) == expected
    assert cfg.model.kind == ("parallel" if not expected else "bihier")
    assert cfg.seed == 3 and cfg.train.num_steps == 7


def test_plan_and_emit():
  variants = ablate.sweep_variants("fusion_mode")
  runs = ablate.plan_runs(variants, [0, 1], "/tmp/abl", "configs/demo.py:tiny")
  assert [(r.variant.name, r.seed) for r in runs] == [
      ("mode_local", 0), ("mode_local", 1), ("mode_global", 0), ("mode_global", 1)]
  assert runs[1].workdir == "/tmp/abl/mode_local/seed1"
  lines = ablate.emit_commands(runs[:1])
  assert lines == [
      "python -m bihier_jax.train --config=configs/demo.py:tiny "
      "--workdir=/tmp/abl/mode_local/seed0 --config.model.fusion.mode=local "
      "--config.seed=0 && python -m bihier_jax.eval --config=configs/demo.py:tiny "
      "--workdir=/tmp/abl/mode_local/seed0 --checkpoint=best "
      "--config.model.fusion.mode=local --config.seed=0"]
  slurm = ablate.emit_commands(runs[:1], "slurm")[0]
  assert slurm.startswith("python -m launch.slurm_gpu --config=configs/demo.py:tiny")
  assert "--set model.fusion.mode=local --set seed=0" in slurm and "--eval" in slurm


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  """A finished run's config.json and real checkpoints: steps 2 (val accuracy 0.9, the
  best) and 4 (0.5, the last of train.num_steps=4); eval JSONs are up to each test."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from bihier_jax.training import checkpointing  # pylint: disable=g-import-not-at-top
  template = str(tmp_path_factory.mktemp("trained_run"))
  with open(os.path.join(template, "config.json"), "w") as f:
    json.dump({"train": {"num_steps": 4},
               "task": {"select_metric": "accuracy", "select_mode": "max"}}, f)
  ckpt = checkpointing.Checkpointer(template, keep=1, select_metric="accuracy")
  for step, accuracy in ((2, 0.9), (4, 0.5)):
    ckpt.save(step, {"w": jnp.full([2], float(step))}, {"consumed": step},
              {"accuracy": accuracy})
    ckpt.wait()
  ckpt.close()
  return template


def _copy_run(template, workdir):
  shutil.copytree(template, workdir, dirs_exist_ok=True)  # keeps the files' times


def _write_result(run, split="test", *, step=2, checkpoint="best", **metrics):
  os.makedirs(os.path.dirname(run.eval_json(split)), exist_ok=True)
  with open(run.eval_json(split), "w") as f:
    json.dump({**metrics, "step": step, "checkpoint": checkpoint}, f)


def _fake_runs(tmp_path, values, template):
  """Finished runs with eval/test.json of their best checkpoint for {variant:
  [accuracy per seed]}; returns the runs."""
  variants = [ablate.Variant(name, ()) for name in values]
  seeds = range(max(len(v) for v in values.values()))
  runs = ablate.plan_runs(variants, list(seeds), str(tmp_path), "c.py")
  for run in runs:
    per_seed = values[run.variant.name]
    if run.seed >= len(per_seed):
      continue
    _copy_run(template, run.workdir)
    _write_result(run, accuracy=per_seed[run.seed], loss=1.0 - per_seed[run.seed],
                  note="not a number", count=10, num_items=448.0)
  return runs


def test_aggregation_matches_numpy(tmp_path, trained_run):
  values = {"a": [0.5, 0.7, 0.9], "b": [0.1, 0.4], "c": [0.3]}
  runs = _fake_runs(tmp_path, values, trained_run)
  rows = ablate.collect_results(runs, "test")
  assert len(rows) == 6
  assert ablate.metric_names(rows) == ["accuracy", "loss", "count"]
  summary = ablate.summarize(rows)
  for name, vals in values.items():
    mean, std, n = summary[name]["accuracy"]
    assert n == len(vals)
    np.testing.assert_allclose(mean, np.mean(vals), rtol=1e-12)
    if n >= 2:
      np.testing.assert_allclose(std, np.std(vals, ddof=1), rtol=1e-12)
    else:
      assert np.isnan(std)


def test_aggregate_writes_csv_table_png(tmp_path, trained_run):
  values = {"levels_none": [0.50, 0.60], "levels_4": [0.70, 0.74]}
  runs = _fake_runs(tmp_path, values, trained_run)
  out = ablate.aggregate(runs, str(tmp_path), "fusion_depth", "test", "accuracy",
                         caption="caption here")
  with open(out.csv) as f:
    table = list(csv.DictReader(f))
  assert [(r["variant"], int(r["seed"]), int(r["step"]), float(r["accuracy"]))
          for r in table] == [("levels_none", 0, 2, 0.5), ("levels_none", 1, 2, 0.6),
                              ("levels_4", 0, 2, 0.7), ("levels_4", 1, 2, 0.74)]
  md = open(out.markdown).read()
  assert "| variant | seeds | accuracy | loss | count |" in md
  std = np.std([0.70, 0.74], ddof=1)
  assert f"| levels_4 | 2 | 0.720 ± {std:.3f} |" in md
  assert md.rstrip().endswith("caption here")
  with open(out.png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  import matplotlib.image
  assert matplotlib.image.imread(out.png).shape[0] > 100


def test_aggregate_rejects_bad_json(tmp_path, trained_run):
  runs = _fake_runs(tmp_path, {"a": [0.5]}, trained_run)
  with open(runs[0].eval_json("test"), "w") as f:
    f.write("{broken")
  with pytest.raises(ValueError, match="not valid JSON"):
    ablate.collect_results(runs, "test")


def test_only_current_results_of_the_best_checkpoint_count(tmp_path, trained_run,
                                                            capsys):
  names = ("current", "last_step", "other_step", "stale", "unfinished", "untrained")
  runs = ablate.plan_runs([ablate.Variant(n, ()) for n in names], [0], str(tmp_path),
                          "c.py")
  by_name = {r.variant.name: r for r in runs}
  for run in runs[:-1]:
    _copy_run(trained_run, run.workdir)
  _write_result(by_name["current"], accuracy=0.8)
  _write_result(by_name["last_step"], step=4, checkpoint="latest", accuracy=0.7)
  _write_result(by_name["other_step"], step=4, checkpoint="best", accuracy=0.7)
  _write_result(by_name["stale"], accuracy=0.6)
  written = os.path.getmtime(os.path.join(trained_run, "checkpoints", "2"))
  os.utime(by_name["stale"].eval_json("test"), (written - 60, written - 60))
  with open(os.path.join(by_name["unfinished"].workdir, "config.json"), "w") as f:
    json.dump({"train": {"num_steps": 6},
               "task": {"select_metric": "accuracy", "select_mode": "max"}}, f)
  _write_result(by_name["unfinished"], accuracy=0.5)
  _write_result(by_name["untrained"], accuracy=0.5)
  status = {r.variant.name: ablate.run_status(r, "test") for r in runs}
  assert {n: s.action for n, s in status.items()} == {
      "current": "done", "last_step": "evaluate", "other_step": "evaluate",
      "stale": "evaluate", "unfinished": "train", "untrained": "train"}
  assert "older than the best checkpoint" in status["stale"].reason
  assert "step 4 of 6" in status["unfinished"].reason
  rows = ablate.collect_results(runs, "test")
  assert rows == [{"variant": "current", "seed": 0, "step": 2, "accuracy": 0.8}]
  assert capsys.readouterr().err.count("ignored") == 5
  # A flag that asks for more steps than the run has makes it unfinished as well.
  longer = ablate.plan_runs([ablate.Variant("current", (("train.num_steps", "8"),))],
                            [0], str(tmp_path), "c.py")[0]
  assert ablate.run_status(longer, "test").action == "train"


def _fake_python(tmp_path):
  """A stand-in interpreter. 'train' copies $FAKE_TRAINED_RUN into the workdir;
  'eval' writes eval/test.json of checkpoint 'best' at step 2; both append their
  module to <workdir>/commands; a workdir named *bad* fails with status 3."""
  fake = tmp_path / "fakepython"
  fake.write_text(
      "#!" + sys.executable + "\n"
      "import json, os, shutil, sys\n"
      "wd = [a.split('=', 1)[1] for a in sys.argv if a.startswith('--workdir=')][0]\n"
      "if 'bad' in wd: sys.exit(3)\n"
      "os.makedirs(wd, exist_ok=True)\n"
      "open(os.path.join(wd, 'commands'), 'a').write(sys.argv[2] + '\\n')\n"
      "if sys.argv[2] == 'bihier_jax.train':\n"
      "  shutil.copytree(os.environ['FAKE_TRAINED_RUN'], wd, dirs_exist_ok=True)\n"
      "if sys.argv[2] == 'bihier_jax.eval':\n"
      "  assert '--checkpoint=best' in sys.argv\n"
      "  os.makedirs(os.path.join(wd, 'eval'), exist_ok=True)\n"
      "  json.dump({'accuracy': 0.5, 'step': 2, 'checkpoint': 'best'},\n"
      "            open(os.path.join(wd, 'eval', 'test.json'), 'w'))\n")
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  return str(fake)


def test_run_locally_evaluates_or_trains_what_does_not_count(tmp_path, trained_run):
  names = ("fresh", "crashed_eval", "last_step", "stale", "current", "unfinished", "bad")
  variants = [ablate.Variant(n, (("train.num_steps", "6"),) if n == "unfinished" else ())
              for n in names]
  runs = ablate.plan_runs(variants, [0], str(tmp_path / "sweep"), "c.py")
  by_name = {r.variant.name: r for r in runs}
  for name in ("crashed_eval", "last_step", "stale", "current", "unfinished"):
    _copy_run(trained_run, by_name[name].workdir)
  _write_result(by_name["last_step"], step=4, checkpoint="latest", accuracy=0.1)
  _write_result(by_name["stale"], accuracy=0.1)
  written = os.path.getmtime(os.path.join(trained_run, "checkpoints", "2"))
  os.utime(by_name["stale"].eval_json("test"), (written - 60, written - 60))
  _write_result(by_name["current"], accuracy=0.9)
  env = dict(os.environ, FAKE_TRAINED_RUN=trained_run)
  failed = ablate.run_locally(runs, "test", python=_fake_python(tmp_path), env=env)
  # The unfinished run trained but stays short of its 6 steps; bad exits 3.
  assert [r.variant.name for r in failed] == ["unfinished", "bad"]

  def commands(name):
    path = os.path.join(by_name[name].workdir, "commands")
    return open(path).read().split() if os.path.exists(path) else []
  assert commands("fresh") == ["bihier_jax.train", "bihier_jax.eval"]
  for name in ("crashed_eval", "last_step", "stale"):  # trained: evaluation only
    assert commands(name) == ["bihier_jax.eval"], name
  assert commands("current") == []
  assert not os.path.exists(os.path.join(by_name["current"].workdir, "ablate.log"))
  assert commands("unfinished") == ["bihier_jax.train", "bihier_jax.eval"]
  rows = ablate.collect_results(runs, "test")
  assert [(r["variant"], r["step"], r["accuracy"]) for r in rows] == [
      ("fresh", 2, 0.5), ("crashed_eval", 2, 0.5), ("last_step", 2, 0.5),
      ("stale", 2, 0.5), ("current", 2, 0.9)]
  # Run again: everything that counts is skipped.
  assert [r.variant.name for r in ablate.run_locally(
      runs, "test", python=_fake_python(tmp_path), env=env)] == ["unfinished", "bad"]
  assert commands("fresh") == ["bihier_jax.train", "bihier_jax.eval"]


def _train_cli_available():
  return (os.path.exists(os.path.join(REPO, "bihier_jax", "train.py")) and
          os.path.exists(os.path.join(REPO, "bihier_jax", "eval.py")) and
          os.path.exists(os.path.join(REPO, "configs", "demo.py")))


@pytest.mark.skipif(not _train_cli_available(),
                    reason="bihier_jax.train / bihier_jax.eval / configs/demo.py not there")
@pytest.mark.skipif(not os.environ.get("BIHIER_SLOW_TESTS"),
                    reason="real train+eval subprocesses take 1-3 min on 2 cores, over "
                    "this file's budget; set BIHIER_SLOW_TESTS=1 to run")
def test_tiny_local_run_end_to_end(tmp_path):
  # One variant x one seed through the real CLIs: train 2 steps, eval the test split.
  rc = ablate.main([
      "--config", os.path.join(REPO, "configs/demo.py"), "--config-arg", "tiny",
      "--sweep", "fusion_mode", "--seeds", "0", "--local", "--only", "mode_local",
      "--workdir", str(tmp_path), "--set", "train.num_steps=2",
      "--set", "train.eval_every=1000"])
  logs = [os.path.join(d, "ablate.log") for d, _, f in os.walk(tmp_path)
          if "ablate.log" in f]
  assert rc == 0, open(logs[0]).read()[-3000:]
  with open(tmp_path / "mode_local" / "seed0" / "eval" / "test.json") as f:
    metrics = json.load(f)
  assert (metrics["checkpoint"], metrics["step"]) == ("best", 2)
  assert 0.0 <= metrics["accuracy"] <= 1.0
  md = (tmp_path / "ablation_fusion_mode_test.md").read_text()
  assert f"| mode_local | 1 | {metrics['accuracy']:.3f} (n=1) |" in md
