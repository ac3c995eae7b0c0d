"""Command-line mistakes end in one line on stderr that says what to change, exit status 2.

Each case runs the command as a user would (`python -m bihier_jax.train|eval ...`) with
JAX_PLATFORMS naming no platform: a run that started JAX would die differently, so an
error line with status 2 also shows that the config was checked before JAX started.
The workdir must not exist afterwards. Budget: ~40 s on an idle 2-core machine (the
runs that check values import the model modules, none starts JAX or reads data).
"""

import json
import os
import subprocess
import sys

from configs import demo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(module, *args):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="no_such_platform")
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def _error_line(proc) -> str:
  """The one line a failed command printed (and nothing else)."""
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr[-3000:]
  assert lines[0].startswith("error: ")
  return lines[0]


def _train_error(tmp_path, *args) -> str:
  workdir = tmp_path / "run"
  line = _error_line(_run("bihier_jax.train", "--workdir", str(workdir), *args))
  assert not workdir.exists()  # a failed start leaves nothing behind
  return line


def test_missing_config_file_names_the_closest(tmp_path):
  line = _train_error(tmp_path, "--config", "configs/dmeo.py:tiny")
  assert line == ("error: config file configs/dmeo.py not found "
                  "(did you mean configs/demo.py?)")


def test_unknown_field_names_the_closest(tmp_path):
  line = _train_error(tmp_path, "--config", "configs/demo.py:tiny",
                      "--config.train.batchsize=3")
  assert line == ("error: unknown config field --config.train.batchsize "
                  "(did you mean --config.train.batch_size?)")


def test_bad_value_names_the_allowed_ones(tmp_path):
  line = _train_error(tmp_path, "--config", "configs/demo.py:tiny",
                      "--config.model.fusion.mode=gloabl")
  assert line == ("error: model.fusion.mode='gloabl' is not one of local | global "
                  "(did you mean 'global'?)")


def test_out_of_range_values(tmp_path):
  line = _train_error(tmp_path, "--config", "configs/demo.py:tiny",
                      "--config.train.batch_size=0")
  assert line == "error: train.batch_size=0 must be >= 1"
  # configs/demo.py:tiny has one GNN block: fusion after block 2 cannot happen.
  line = _train_error(tmp_path, "--config", "configs/demo.py:tiny",
                      "--config.model.fusion.levels=(1,2)")
  assert "model.fusion.levels (1, 2)" in line and "1..1" in line


def test_task_config_without_data_dir(tmp_path):
  line = _train_error(tmp_path, "--config", "configs/lba30.py:tiny")
  assert line == ("error: data.dir is not set: set --config.data.dir to the folder "
                  "written by `python -m data_pipelines.preprocess lba30 --out DIR`")


def test_unknown_variant_is_the_config_files_message(tmp_path):
  line = _train_error(tmp_path, "--config", "configs/demo.py:huge")
  assert line == "error: configs/demo.py: unknown variant 'huge' (known: tiny)"


def test_traceback_only_when_asked(tmp_path):
  proc = _run("bihier_jax.train", "--workdir", str(tmp_path / "run"), "--verbosity=1",
              "--config", "configs/demo.py:tiny", "--config.train.batchsize=3")
  assert proc.returncode == 2
  assert "Traceback (most recent call last)" in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith(
      "error: unknown config field --config.train.batchsize")


def test_eval_reads_the_runs_saved_config(tmp_path):
  workdir = tmp_path / "run"
  line = _error_line(_run("bihier_jax.eval", "--workdir", str(workdir)))
  assert line == (f"error: {workdir}/config.json does not exist (no run trained in this "
                  f"workdir): pass --config configs/<task>.py")
  # A saved config (as training writes it) with a mistake in it: eval read it.
  config = demo.get_config("tiny").to_dict()
  config["model"]["kind"] = "bihierr"
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps(config, indent=1))
  line = _error_line(_run("bihier_jax.eval", "--workdir", str(workdir)))
  assert line.startswith("error: model.kind='bihierr' is not one of bihier | ")
  # Overrides apply to the saved config, with the same checks as for a config file.
  line = _error_line(_run("bihier_jax.eval", "--workdir", str(workdir),
                          "--config.data.dri=/tmp"))
  assert line == ("error: unknown config field --config.data.dri "
                  "(did you mean --config.data.dir?)")
  assert sorted(os.listdir(workdir)) == ["config.json"]
