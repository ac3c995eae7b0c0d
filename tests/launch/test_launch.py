"""Launch scripts: `--dry-run` prints exactly the gcloud / sbatch commands expected,
after checking the config as the train command would (one line, exit status 2, nothing
printed otherwise).

Budget: < 5 s (JAX imported for the config checks, no backend, no network, nothing
executed).
"""

import os
import shlex

import pytest

from launch import slurm_gpu
from launch import tpu_vm
from tests.paths import REPO

# c.py: a valid training config for 16 devices, its records in a bucket.
_CONFIG = """from configs import react
def get_config():
  c = react.get_config()
  c.data.dir = "gs://b/records"
  return c
"""


@pytest.fixture(autouse=True)
def _in_a_folder_with_c_py(tmp_path, monkeypatch):
  """The launchers run from a folder holding `c.py` and the repository's configs/."""
  (tmp_path / "c.py").write_text(_CONFIG)
  os.symlink(os.path.join(REPO, "configs"), tmp_path / "configs")
  monkeypatch.chdir(tmp_path)
  monkeypatch.syspath_prepend(REPO)


def _dry_run(capsys, module, argv):
  rc = module.main([*argv, "--dry-run"])
  out = capsys.readouterr().out
  assert rc == 0
  return out.strip().splitlines()


def test_create_single_host(capsys):
  lines = _dry_run(capsys, tpu_vm, ["create", "--name", "bh1", "--zone", "us-central2-b"])
  assert lines == [
      "gcloud compute tpus tpu-vm create bh1 --accelerator-type=v4-8 "
      "--version=tpu-ubuntu2204-base --zone=us-central2-b"]


def test_create_pod_slice_spot_with_project(capsys):
  lines = _dry_run(capsys, tpu_vm, [
      "create", "--name", "bh", "--zone", "us-central2-b", "--project", "proj",
      "--accelerator-type", "v4-32", "--spot"])
  assert lines == [
      "gcloud compute tpus tpu-vm create bh --accelerator-type=v4-32 "
      "--version=tpu-ubuntu2204-base --zone=us-central2-b --project=proj --spot"]


def test_create_queued_resource_spot(capsys):
  lines = _dry_run(capsys, tpu_vm, [
      "create", "--name", "bh", "--zone", "us-central2-b", "--accelerator-type",
      "v4-32", "--queued", "--spot"])
  # The queued-resources API names the image --runtime-version and the node --node-id.
  assert lines == [
      "gcloud compute tpus queued-resources create bh --node-id=bh "
      "--accelerator-type=v4-32 --runtime-version=tpu-ubuntu2204-base "
      "--zone=us-central2-b --spot"]


def test_install_reaches_every_worker(capsys):
  lines = _dry_run(capsys, tpu_vm, ["install", "--name", "bh", "--zone", "z"])
  assert lines[0] == ("git archive --format=tar.gz "
                      "--output=/tmp/bihier_jax_src.tar.gz HEAD")
  assert lines[1] == ("gcloud compute tpus tpu-vm scp /tmp/bihier_jax_src.tar.gz "
                      "'bh:~/' --worker=all --zone=z")
  ssh = shlex.split(lines[2])
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "bh"]
  assert "--worker=all" in ssh and ssh[-1] == "--zone=z"
  remote = next(a for a in ssh if a.startswith("--command="))
  assert remote.startswith("--command=(command -v python3.11 >/dev/null || (sudo "
                           "apt-get update -q && sudo apt-get install -y -q python3.11 "
                           "python3.11-venv)) && ")
  assert "python3.11 -m venv ~/bihier_venv" in remote
  assert "tar -xzf ~/bihier_jax_src.tar.gz -C ~/bihier_jax" in remote
  assert "pip install -q 'jax[tpu]==0.10.2' -e ~/bihier_jax" in remote


def test_train_all_workers_gs_workdir(capsys):
  lines = _dry_run(capsys, tpu_vm, [
      "train", "--name", "bh", "--zone", "z", "--config", "configs/react.py",
      "--workdir", "gs://bkt/run1", "--set", "data.dir=gs://bkt/records",
      "--set", "train.num_steps=100"])
  assert lines == [
      "gcloud compute tpus tpu-vm ssh bh --worker=all '--command=cd ~/bihier_jax && "
      "nohup ~/bihier_venv/bin/python -m bihier_jax.train --config=configs/react.py "
      "--workdir=gs://bkt/run1 --config.train.multi_host=True "
      "--config.data.dir=gs://bkt/records --config.train.num_steps=100 "
      "> ~/bihier_train.log 2>&1 < /dev/null &' --zone=z"]


def test_train_refuses_local_workdir(capsys):
  rc = tpu_vm.main(["train", "--name", "bh", "--zone", "z", "--config", "c.py",
                    "--workdir", "/tmp/run", "--dry-run"])
  assert rc == 2
  assert "gs://" in capsys.readouterr().err


def test_train_rejects_malformed_override():
  with pytest.raises(ValueError, match="key=value"):
    tpu_vm.train_command(tpu_vm.Target("bh", "z"), "c.py", "gs://b/r", ["oops"])


def test_train_fsdp_and_mesh_line(capsys):
  base = ["train", "--name", "bh", "--zone", "z", "--config", "c.py",
          "--workdir", "gs://b/r", "--fsdp", "4"]
  # v4-32: 32 TensorCores = 16 chips, 4 per worker.
  lines = _dry_run(capsys, tpu_vm, [*base, "--accelerator-type", "v4-32"])
  assert lines[0] == "# mesh: data=4 x fsdp=4 (16 devices of v4-32, 4 per worker; " \
                     "train.fsdp=4)"
  assert len(lines) == 2
  # Parameter sharding needs per-layer remat (config_check): --fsdp sets both.
  assert ("--config.train.multi_host=True --config.train.fsdp=4 "
          "--config.model.esm.remat=True > ~/bihier_train.log" in lines[1])
  # Without the accelerator type the device count is not guessed.
  lines = _dry_run(capsys, tpu_vm, base)
  assert lines[0] == "# mesh: fsdp=4, data = devices / 4"
  assert "--config.train.fsdp=4" in lines[1]
  # The same value through --set as well is no conflict.
  lines = _dry_run(capsys, tpu_vm, [*base, "--set", "train.fsdp=4"])
  assert "--config.train.fsdp=4" in lines[1]
  # An explicit --set model.esm.remat=False is kept, so the launcher's own config check
  # refuses it before printing anything; --fsdp 1 needs no remat.
  assert tpu_vm.main([*base, "--set", "model.esm.remat=False", "--dry-run"]) == 2
  out, err = capsys.readouterr()
  assert out == "" and err.strip() == (
      "error: train.fsdp=4 needs model.esm.remat=True (without it every ESM layer's "
      "activations stay in memory for the backward pass): add --set model.esm.remat=True")
  lines = _dry_run(capsys, tpu_vm, [*base[:-1], "1"])
  assert "--config.train.fsdp=1" in lines[1] and "remat" not in lines[1]


def test_tpu_devices_per_worker():
  assert tpu_vm.tpu_devices("v4-8") == (4, 4)
  assert tpu_vm.tpu_devices("v5p-64") == (32, 4)
  assert tpu_vm.tpu_devices("v5litepod-8") == (8, 8)
  assert tpu_vm.tpu_devices("v6e-16") == (16, 4)
  # Families or sizes the rule does not cover: no guess, no check.
  assert tpu_vm.tpu_devices("v3-8") is None
  assert tpu_vm.tpu_devices("v4-12") is None
  assert tpu_vm.tpu_devices("v5litepod-2") is None


def test_train_fsdp_refused(capsys):
  base = ["train", "--name", "bh", "--zone", "z", "--config", "c.py",
          "--workdir", "gs://b/r", "--dry-run"]
  assert tpu_vm.main([*base, "--fsdp", "4", "--set", "train.fsdp=2"]) == 2
  out = capsys.readouterr()
  assert out.out == ""
  assert out.err == ("error: --fsdp 4 conflicts with --set train.fsdp=2: give only "
                     "one of them (or the same value)\n")
  # v5litepod-16: 4 hosts of 4 chips; a group of 8 would span two workers.
  assert tpu_vm.main([*base, "--fsdp", "8", "--accelerator-type", "v5litepod-16"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1
  assert "--fsdp 8" in err and "--accelerator-type v5litepod-16" in err
  assert "use --fsdp 1, 2 or 4" in err


def test_logs_status_stop(capsys):
  assert _dry_run(capsys, tpu_vm, ["logs", "--name", "bh", "--zone", "z",
                                   "--worker", "3"]) == [
      "gcloud compute tpus tpu-vm ssh bh --worker=3 "
      "'--command=tail -n 200 -F ~/bihier_train.log' --zone=z"]
  assert _dry_run(capsys, tpu_vm, ["status", "--name", "bh", "--zone", "z",
                                   "--queued"]) == [
      "gcloud compute tpus queued-resources describe bh --zone=z"]
  assert _dry_run(capsys, tpu_vm, ["stop", "--name", "bh", "--zone", "z"]) == [
      "gcloud compute tpus tpu-vm ssh bh --worker=all "
      "'--command=pkill -f '\"'\"'[b]ihier_jax.train'\"'\"' || true' --zone=z"]


def test_cleanup(capsys):
  assert _dry_run(capsys, tpu_vm, ["delete", "--name", "bh", "--zone", "z"]) == [
      "gcloud compute tpus tpu-vm delete bh --quiet --zone=z"]
  # --force also deletes the node the queued resource provisioned.
  assert _dry_run(capsys, tpu_vm, ["delete", "--name", "bh", "--zone", "z",
                                   "--queued"]) == [
      "gcloud compute tpus queued-resources delete bh --force --quiet --zone=z"]


def test_execute_stops_at_first_failure(capsys):
  rc = tpu_vm.execute([["false"], ["echo", "never"]], dry_run=False)
  assert rc == 1
  assert "never" not in capsys.readouterr().out.replace("+ echo never", "")


def test_slurm_script_one_task_per_gpu(capsys):
  lines = _dry_run(capsys, slurm_gpu, [
      "--config", "c.py", "--workdir", "/shared/run", "--nodes", "2",
      "--gpus-per-node", "4", "--partition", "gpu", "--account", "lab",
      "--venv", "/shared/venv", "--set", "train.num_steps=10", "--eval"])
  text = "\n".join(lines)
  for directive in ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4",
                    "#SBATCH --gpus-per-node=4", "#SBATCH --partition=gpu",
                    "#SBATCH --account=lab"]:
    assert directive in lines, directive
  # Per-task GPU binding would break jax's SLURM_LOCALID -> GPU mapping.
  assert "--gpus-per-task" not in text and "--gpu-bind" not in text
  assert "source /shared/venv/bin/activate" in lines
  assert ("srun --ntasks=8 --ntasks-per-node=4 --kill-on-bad-exit=1 python -m "
          "bihier_jax.train --config=c.py --workdir=/shared/run "
          "--config.train.multi_host=True --config.train.num_steps=10") in lines
  assert ("srun --nodes=1 --ntasks=1 python -m bihier_jax.eval "
          "--config=c.py --workdir=/shared/run "
          "--config.train.num_steps=10") in lines
  assert lines[-1] == "sbatch bihier.sbatch"
  assert lines[1] == "#!/bin/bash"


def test_slurm_script_written_and_submitted(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(slurm_gpu.subprocess, "run",
                      lambda cmd, check: calls.append(cmd) or
                      type("R", (), {"returncode": 0})())
  path = tmp_path / "job.sbatch"
  rc = slurm_gpu.main(["--config", "c.py", "--workdir", "/w", "--nodes", "1",
                       "--gpus-per-node", "2", "--script", str(path)])
  assert rc == 0 and calls == [["sbatch", str(path)]]
  assert path.read_text() == slurm_gpu.sbatch_script(
      slurm_gpu.SlurmJob(config="c.py", workdir="/w", nodes=1, gpus_per_node=2))


def test_slurm_fsdp_in_train_and_eval(capsys):
  lines = _dry_run(capsys, slurm_gpu, [
      "--config", "c.py", "--workdir", "/w", "--nodes", "2", "--gpus-per-node", "8",
      "--fsdp", "4", "--eval"])
  assert "# mesh: data=4 x fsdp=4 (16 devices; train.fsdp=4)" in lines
  assert ("srun --ntasks=16 --ntasks-per-node=8 --kill-on-bad-exit=1 python -m "
          "bihier_jax.train --config=c.py --workdir=/w --config.train.multi_host=True "
          "--config.train.fsdp=4 --config.model.esm.remat=True") in lines
  # Eval restores the checkpoint onto a mesh built the same way.
  assert ("srun --nodes=1 --ntasks=1 python -m bihier_jax.eval --config=c.py "
          "--workdir=/w --config.train.fsdp=4 --config.model.esm.remat=True") in lines
  # Every line of the script that is no command is a comment.
  script = lines[lines.index("#!/bin/bash"):lines.index("# --- submit ---")]
  assert all(not line or line.startswith(("#", "set ", "export ", "srun "))
             for line in script)


def test_slurm_fsdp_refused(capsys):
  base = ["--config", "c.py", "--workdir", "/w", "--nodes", "2", "--dry-run"]
  assert slurm_gpu.main([*base, "--gpus-per-node", "8", "--fsdp", "3"]) == 2
  out = capsys.readouterr()
  assert out.out == ""
  assert out.err == ("error: --fsdp 3 does not divide --gpus-per-node 8: an fsdp group "
                     "must lie within one node; use --fsdp 1, 2, 4 or 8\n")
  # The value may also come from --set; 16 divides the 32 GPUs but not one node's 8.
  assert slurm_gpu.main([*base, "--gpus-per-node", "8", "--nodes", "4",
                         "--set", "train.fsdp=16"]) == 2
  err = capsys.readouterr().err
  assert "--set train.fsdp=16 does not divide --gpus-per-node 8" in err
  assert slurm_gpu.main([*base, "--fsdp", "2", "--set", "train.fsdp=4"]) == 2
  assert "--fsdp 2 conflicts with --set train.fsdp=4" in capsys.readouterr().err


def _refused(capsys, module, argv) -> str:
  """The one error line of a refused launch; nothing was printed or run."""
  rc = module.main([*argv, "--dry-run"])
  out = capsys.readouterr()
  assert rc == 2 and out.out == "", (rc, out)
  assert out.err.count("\n") == 1 and out.err.startswith("error: "), out.err
  return out.err.strip()


_TPU = ["train", "--name", "bh", "--zone", "z", "--workdir", "gs://b/r"]


def test_tpu_train_checks_the_config_first(capsys):
  line = _refused(capsys, tpu_vm, [*_TPU, "--config", "c.py",
                                   "--set", "train.batchsize=64"])
  assert line == ("error: unknown config field --set train.batchsize "
                  "(did you mean --set train.batch_size?)")
  line = _refused(capsys, tpu_vm, [*_TPU, "--config", "configs/react.py"])
  assert line == ("error: data.dir is not set: pass --set data.dir to the folder "
                  "written by `python -m data_pipelines.preprocess react --out DIR`")
  line = _refused(capsys, tpu_vm, [*_TPU, "--config", "c.py", "--set",
                                   "model.esm.trainable=LoRA"])
  assert line.endswith("(did you mean 'lora'?)")
  # Workers share no disk: local records must go to a bucket first.
  line = _refused(capsys, tpu_vm, [*_TPU, "--config", "c.py", "--set",
                                   "data.dir=/data/react"])
  assert line == ("error: data.dir=/data/react is on this machine; TPU workers share "
                  "no disk: copy it to a bucket and --set data.dir=gs://... "
                  "(docs/cloud.md)")
  # A single TPU VM's own disk (--allow-local-workdir) is not this machine's: unchecked.
  assert _dry_run(capsys, tpu_vm, [*_TPU, "--config", "c.py", "--set",
                                   "data.dir=/data/react", "--allow-local-workdir"])


def test_tpu_train_checks_the_batch_against_the_slice(capsys):
  # v4-8: 4 chips on one worker; react's batch of 32 splits, 30 does not.
  assert _dry_run(capsys, tpu_vm, [*_TPU, "--config", "c.py",
                                   "--accelerator-type", "v4-8"])
  line = _refused(capsys, tpu_vm, [*_TPU, "--config", "c.py", "--accelerator-type",
                                   "v4-8", "--set", "train.batch_size=30"])
  assert line == ("error: train.batch_size=30 is not a multiple of the 4 devices x "
                  "train.grad_accum_steps=1 (one padded sub-batch per device and "
                  "micro-batch): pass --set train.batch_size=32, or run on fewer devices "
                  "(a divisor of 30)")
  line = _refused(capsys, tpu_vm, [*_TPU, "--config", "c.py", "--set",
                                   "train.grad_accum_steps=3"])
  assert line.startswith("error: train.batch_size=32 is not a multiple of "
                         "train.grad_accum_steps=3")


def test_slurm_checks_the_config_and_local_records(capsys, tmp_path):
  base = ["--config", "configs/react.py", "--workdir", "/w", "--nodes", "1",
          "--gpus-per-node", "4"]
  line = _refused(capsys, slurm_gpu, [*base, "--set", f"data.dir={tmp_path}/none"])
  assert line.startswith(f"error: data.dir={tmp_path}/none does not exist: pass --set "
                         "data.dir to the folder written by")
  records = tmp_path / "records"
  records.mkdir()
  (records / "metadata.json").write_text("{}")
  assert _dry_run(capsys, slurm_gpu, [*base, "--set", f"data.dir={records}"])
  # 3 nodes x 4 GPUs: 12 devices do not split react's batch of 32.
  line = _refused(capsys, slurm_gpu, [*base, "--set", f"data.dir={records}",
                                      "--nodes", "3"])
  assert line.startswith("error: train.batch_size=32 is not a multiple of the 12 "
                         "devices x train.grad_accum_steps=1")
