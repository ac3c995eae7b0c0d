"""Command-line mistakes end in one line on stderr that says what to change, exit status 2.

Each case runs the command as a user would (`python -m bihier_jax.train|eval ...`) with
JAX_PLATFORMS naming no platform: a run that started JAX would die differently, so an
error line with status 2 also shows that the config was checked before JAX started.
The workdir must not exist afterwards. Device-count mistakes need the device count, so
that case starts JAX (8 simulated CPU devices) and must end before any data is read.
Budget: ~60 s on an idle 2-core machine (the runs that check values import the model
modules, one starts JAX, none reads data).
"""

import json
import os
import subprocess
import sys

import pytest

from configs import demo
from tests.paths import REPO


def _run(module, *args, env=None):
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "no_such_platform",
         **(env or {})}
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


def test_accumulation_and_fsdp_that_cannot_split_the_batch(tmp_path):
  line = _train_error(tmp_path, "--config", "configs/demo.py:tiny",
                      "--config.train.grad_accum_steps=3")
  assert line == ("error: train.batch_size=2 is not a multiple of "
                  "train.grad_accum_steps=3 (each update sums 3 equal micro-batches): "
                  "set --config.train.grad_accum_steps to 1 or 2, or "
                  "--config.train.batch_size to a multiple of 3")
  from bihier_jax import config_check  # pylint: disable=import-outside-toplevel
  with pytest.raises(config_check.ConfigError) as info:  # the same check, in-process
    config_check.check(_with(demo.get_config("tiny"), fsdp=3), needs_data=False)
  line = f"error: {info.value}"
  assert line == ("error: train.fsdp=3 needs train.batch_size=2 to be a multiple of 3 x "
                  "train.grad_accum_steps=1 (every device of an fsdp group takes its own "
                  "sub-batch): set --config.train.fsdp to 1 or 2 (one that divides your "
                  "devices per host), or --config.train.batch_size to a multiple of 3")


def test_readme_demo_on_eight_devices(tmp_path):
  """configs/demo.py's batch of 4 on 8 devices: one line once the devices are known,
  before the demo records are built or the workdir made."""
  data = tmp_path / "demo_records"
  flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  proc = _run("bihier_jax.train", "--config", "configs/demo.py", "--workdir",
              str(tmp_path / "run"), f"--config.data.dir={data}",
              env={"JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags})
  assert proc.returncode == 2, proc.stderr[-3000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
  assert errors == [
      "error: train.batch_size=4 is not a multiple of the 8 devices x "
      "train.grad_accum_steps=1 (one padded sub-batch per device and micro-batch): set "
      "--config.train.batch_size=8, or run on fewer devices (a divisor of 4)"], proc.stderr
  assert "Traceback" not in proc.stderr
  assert not data.exists() and not (tmp_path / "run").exists()


def test_a_preset_named_against_the_checkpoint(tmp_path):
  """The checkpoint's config.json is read before JAX starts (its weights are not)."""
  checkpoint = tmp_path / "esm2_t12_35M_UR50D"
  checkpoint.mkdir()
  (checkpoint / "config.json").write_text(json.dumps({
      "model_type": "esm", "num_hidden_layers": 12, "hidden_size": 480,
      "num_attention_heads": 20, "intermediate_size": 1920, "vocab_size": 33,
      "position_embedding_type": "rotary", "token_dropout": True,
      "emb_layer_norm_before": False, "mask_token_id": 32, "pad_token_id": 1}))
  line = _train_error(tmp_path, "--config", "configs/demo.py:tiny",
                      f"--config.model.esm.checkpoint={checkpoint}",
                      "--config.model.esm.preset=t6_8M")
  assert line == (f"error: --config.model.esm.preset=t6_8M conflicts with "
                  f"model.esm.checkpoint={checkpoint}, a t12_35M checkpoint (12 layers x "
                  "480 wide, 20 heads): leave the preset out (it is read from the "
                  "checkpoint) or give a checkpoint of that size")


def test_device_rules_name_the_fix():
  """The checks the train command runs once the devices are known (in-process)."""
  from bihier_jax import config_check  # pylint: disable=import-outside-toplevel
  config = demo.get_config("tiny")
  config.train.batch_size, config.train.fsdp = 6, 2
  config_check.check_devices(config, 2, [2])
  with pytest.raises(config_check.ConfigError) as info:
    config_check.check_devices(config, 3, [3])
  assert str(info.value) == ("train.fsdp=2 does not divide the 3 device(s) of this "
                             "machine (an fsdp group stays within one host): set "
                             "--config.train.fsdp to 1 or 3")
  with pytest.raises(config_check.ConfigError, match="the 4 device.s. of each host"):
    config_check.check_devices(_with(config, batch_size=8, fsdp=8), 8, [4, 4])


def _with(config, **train):
  """`config` with train fields set; remat on where fsdp > 1, as the launchers set it."""
  out = config.copy_and_resolve_references()
  for key, value in train.items():
    out.train[key] = value
  if out.train.fsdp > 1:
    out.model.esm.remat = True
  return out


def test_evaluation_fits_a_run_to_the_devices_at_hand():
  from bihier_jax import config_check  # pylint: disable=import-outside-toplevel
  config = _with(demo.get_config("tiny"), batch_size=8, fsdp=4, grad_accum_steps=2)
  same, note = config_check.fit_to_devices(config, 4, [4])
  assert same is config and note is None
  fitted, note = config_check.fit_to_devices(config, 2, [2])
  assert (fitted.train.fsdp, fitted.train.batch_size, fitted.train.grad_accum_steps) == (
      2, 8, 2)
  assert note == ("evaluating on the 2 device(s) here: train.fsdp 4 -> 2 (the metrics do "
                  "not depend on them)")
  fitted, note = config_check.fit_to_devices(config, 3, [3])
  assert (fitted.train.fsdp, fitted.train.batch_size, fitted.train.grad_accum_steps) == (
      1, 3, 1)
  config_check.check_devices(fitted, 3, [3])
  assert config.train.fsdp == 4  # the run's own config is left alone
