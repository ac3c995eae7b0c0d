"""Ablation sweeps: variant expansion, config flags, local runner, aggregation.

Budget: < 10 s without the real tiny run; the real run (train CLI + demo config) is
skipped unless both exist, and is kept to a few steps.
"""

import csv
import json
import os
import stat
import sys

import numpy as np
import pytest

from launch import ablate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
      "--workdir=/tmp/abl/mode_local/seed0 --config.model.fusion.mode=local "
      "--config.seed=0"]
  slurm = ablate.emit_commands(runs[:1], "slurm")[0]
  assert slurm.startswith("python -m launch.slurm_gpu --config=configs/demo.py:tiny")
  assert "--set model.fusion.mode=local --set seed=0" in slurm and "--eval" in slurm


def _fake_runs(tmp_path, values):
  """Writes eval/test.json for {variant: [accuracy per seed]}; returns the runs."""
  variants = [ablate.Variant(name, ()) for name in values]
  seeds = range(max(len(v) for v in values.values()))
  runs = ablate.plan_runs(variants, list(seeds), str(tmp_path), "c.py")
  for run in runs:
    per_seed = values[run.variant.name]
    if run.seed >= len(per_seed):
      continue
    os.makedirs(os.path.dirname(run.eval_json("test")))
    with open(run.eval_json("test"), "w") as f:
      json.dump({"accuracy": per_seed[run.seed], "loss": 1.0 - per_seed[run.seed],
                 "note": "not a number", "count": 10, "step": 200,
                 "num_items": 448.0}, f)
  return runs


def test_aggregation_matches_numpy(tmp_path):
  values = {"a": [0.5, 0.7, 0.9], "b": [0.1, 0.4], "c": [0.3]}
  runs = _fake_runs(tmp_path, values)
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


def test_aggregate_writes_csv_table_png(tmp_path):
  values = {"levels_none": [0.50, 0.60], "levels_4": [0.70, 0.74]}
  runs = _fake_runs(tmp_path, values)
  out = ablate.aggregate(runs, str(tmp_path), "fusion_depth", "test", "accuracy",
                         caption="caption here")
  with open(out.csv) as f:
    table = list(csv.DictReader(f))
  assert [(r["variant"], int(r["seed"]), float(r["accuracy"])) for r in table] == [
      ("levels_none", 0, 0.5), ("levels_none", 1, 0.6), ("levels_4", 0, 0.7),
      ("levels_4", 1, 0.74)]
  md = open(out.markdown).read()
  assert "| variant | seeds | accuracy | loss | count |" in md
  std = np.std([0.70, 0.74], ddof=1)
  assert f"| levels_4 | 2 | 0.720 ± {std:.3f} |" in md
  assert md.rstrip().endswith("caption here")
  with open(out.png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  import matplotlib.image
  assert matplotlib.image.imread(out.png).shape[0] > 100


def test_aggregate_rejects_bad_json(tmp_path):
  runs = _fake_runs(tmp_path, {"a": [0.5]})
  with open(runs[0].eval_json("test"), "w") as f:
    f.write("{broken")
  with pytest.raises(ValueError, match="not valid JSON"):
    ablate.collect_results(runs, "test")


def test_run_locally_skips_done_and_reports_failures(tmp_path):
  # A stand-in interpreter: "eval" writes the JSON unless the variant is named bad.
  fake = tmp_path / "fakepython"
  fake.write_text(
      "#!" + sys.executable + "\n"
      "import json, os, sys\n"
      "wd = [a.split('=', 1)[1] for a in sys.argv if a.startswith('--workdir=')][0]\n"
      "if 'bad' in wd: sys.exit(3)\n"
      "if sys.argv[2] == 'bihier_jax.eval':\n"
      "  os.makedirs(os.path.join(wd, 'eval'), exist_ok=True)\n"
      "  json.dump({'accuracy': 0.5}, open(os.path.join(wd, 'eval', 'test.json'), 'w'))\n")
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  variants = [ablate.Variant("good", ()), ablate.Variant("bad", ())]
  runs = ablate.plan_runs(variants, [0], str(tmp_path / "sweep"), "c.py")
  failed = ablate.run_locally(runs, "test", python=str(fake))
  assert [r.variant.name for r in failed] == ["bad"]
  assert os.path.exists(runs[0].eval_json("test"))
  os.remove(runs[0].workdir + "/ablate.log")
  assert ablate.run_locally(runs[:1], "test", python=str(fake)) == []
  assert not os.path.exists(runs[0].workdir + "/ablate.log")  # skipped: already done


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
      "--set", "train.eval_every=1000", "--set", "data.eval_splits=('test',)"])
  logs = [os.path.join(d, "ablate.log") for d, _, f in os.walk(tmp_path)
          if "ablate.log" in f]
  assert rc == 0, open(logs[0]).read()[-3000:]
  with open(tmp_path / "mode_local" / "seed0" / "eval" / "test.json") as f:
    metrics = json.load(f)
  assert 0.0 <= metrics["accuracy"] <= 1.0
  md = (tmp_path / "ablation_fusion_mode_test.md").read_text()
  assert f"| mode_local | 1 | {metrics['accuracy']:.3f} (n=1) |" in md
