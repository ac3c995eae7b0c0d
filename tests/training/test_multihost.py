"""Two JAX processes x 4 devices give the numbers of one process x 8 devices.

Every run is the demo's tiny config at a global batch of 8 (tests/training/multihost_job.py),
started alone (8 simulated devices) or by `python -m launch.local --processes 2
--devices-per-process 4` (gloo collectives across the processes). Three launches carry
every check:

  1. 2 processes, train.fsdp=4: train, SIGKILLed in both processes when step 3's
     checkpoint is asked for (after step 2's evaluation and checkpoint);
  2. 1 process: the uninterrupted reference run (its final evaluation of the best
     checkpoint); the 2-process checkpoint of step 2 continued to the end (without
     evaluations: its losses are checked); prediction from the reference's best
     checkpoint;
  3. 2 processes: launch 1's run restarted (train.fsdp=4); the reference's checkpoint
     of step 2 continued (train.fsdp=1, no evaluations); evaluation and prediction of a
     copy of the reference's run.

Checked: the losses of every step within 1e-5 of the reference (killed, resumed, and
continued across host counts both ways); the 2-process evaluation's metrics equal to
the reference's, every protein of a split once and each of its labelled residues once
(read from the records), although the 7 test proteins do not split evenly over 2
hosts; prediction equal. One launch whose process 1 fails ends the other with a line
naming it. Budget: the three launches share the session's compilation cache; 169 s
for this file and test_batch_plan.py on the 2-core VM at load ≈ 1–2 (the launches
160 s), 505 s at load ≈ 10.
"""

import itertools
import json
import os
import shutil
import subprocess
import sys
import time

import flax
import numpy as np
import pytest

from bihier_jax.data import batch_plan
from bihier_jax.data import pipeline
from bihier_jax.data import records
from bihier_jax.training import device_batches
from tests.training import multihost_job
from tests.training.test_train import _env, _losses
from tests.paths import REPO

JOB = os.path.join(REPO, "tests", "training", "multihost_job.py")
KILL_AT = 3  # the checkpoint whose save the killed run never reaches
CONTINUE_FROM = 2  # the checkpoint continued on the other host count


def _launch(args, *, processes, log_dir=None, timeout=900):
  env = _env()
  if processes == 1:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                        + " --xla_force_host_platform_device_count=8").strip()
    cmd = [sys.executable, JOB, *args]
  else:
    cmd = [sys.executable, "-m", "launch.local", "--processes", str(processes),
           "--devices-per-process", "4", "--log-dir", log_dir, "--",
           sys.executable, JOB, "--multi-host", *args]
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=timeout)


def _copy_run(src, dst, up_to=None):
  """A copy of a run directory with its checkpoints up to step `up_to` (all if None)
  and no logs or results, to continue elsewhere."""
  shutil.copytree(src, dst)
  for name in ("metrics.jsonl", "eval"):
    path = os.path.join(dst, name)
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif os.path.exists(path):
      os.remove(path)
  if up_to is not None:
    for step in os.listdir(os.path.join(dst, "checkpoints")):
      if step.isdigit() and int(step) > up_to:
        shutil.rmtree(os.path.join(dst, "checkpoints", step))


def _ok(proc, what):
  assert proc.returncode == 0, (what, proc.stdout[-4000:], proc.stderr[-4000:])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, demo_data):
  root = tmp_path_factory.mktemp("multihost")
  w = {k: str(root / k) for k in ("two", "ref", "two_to_one", "one_to_two", "ref_copy")}
  predictions = {1: str(root / "predict1.npz"), 2: str(root / "predict2.npz")}
  logs = str(root / "logs")
  data = ["--data", demo_data]
  killed = _launch([*data, "--fsdp", "4", "--train", w["two"],
                    "--kill-at-save", str(KILL_AT)], processes=2, log_dir=logs + "1")
  assert killed.returncode == 137, (killed.stdout[-4000:], killed.stderr[-4000:])
  after_kill = _losses(w["two"])
  _copy_run(w["two"], w["two_to_one"], up_to=CONTINUE_FROM)
  _ok(_launch([*data, "--train", w["ref"], "--continue", w["two_to_one"],
               "--predict", w["ref"], predictions[1]], processes=1), "one process")
  _copy_run(w["ref"], w["one_to_two"], up_to=CONTINUE_FROM)
  _copy_run(w["ref"], w["ref_copy"])
  two = _launch([*data, "--fsdp", "4", "--train", w["two"], "--continue-fsdp-1",
                 w["one_to_two"], "--evaluate", w["ref_copy"], "--predict",
                 w["ref_copy"], predictions[2]], processes=2, log_dir=logs + "3")
  _ok(two, "two processes")
  return dict(w, killed=killed, after_kill=after_kill, restarted=two,
              predictions=predictions, data=demo_data)


def _assert_losses(workdir, reference, steps):
  got, want = _losses(workdir), _losses(reference)
  assert sorted(got) == list(steps), got
  for step in steps:
    np.testing.assert_allclose(got[step], want[step][0], rtol=0, atol=1e-5,
                               err_msg=f"{workdir} step {step}")


def test_two_processes_train_as_one_killed_and_resumed(runs):
  assert "process 0 was killed by SIGKILL" in runs["killed"].stdout or (
      "process 1 was killed by SIGKILL" in runs["killed"].stdout)
  # Logged before the kill: steps 1..3, equal to one process's.
  assert sorted(runs["after_kill"]) == [1, 2, 3]
  # The restart and the continued reference, as process 0 logs them.
  resumed = [line for line in runs["restarted"].stdout.splitlines()
             if line.startswith("[0] ") and "resumed from checkpoint 2" in line]
  assert len(resumed) == 2, resumed
  _assert_losses(runs["ref"], runs["ref"], range(1, multihost_job.NUM_STEPS + 1))
  # Steps 3 and on twice (before the kill, after the restart), each as one process's.
  _assert_losses(runs["two"], runs["ref"], range(1, multihost_job.NUM_STEPS + 1))
  assert len(_losses(runs["two"])[3]) == 2
  final = {k: json.load(open(os.path.join(runs[k], "eval", "test.json")))
           for k in ("two", "ref")}
  assert final["two"]["step"] == final["ref"]["step"]
  assert final["two"]["accuracy"] == pytest.approx(final["ref"]["accuracy"], abs=1e-6)


def test_checkpoints_continue_on_the_other_host_count(runs):
  later = range(CONTINUE_FROM + 1, multihost_job.NUM_STEPS + 1)
  _assert_losses(runs["two_to_one"], runs["ref"], later)  # written by 2, on 1 process
  _assert_losses(runs["one_to_two"], runs["ref"], later)  # written by 1, on 2 processes


def _labelled_residues(data_dir, split):
  """{protein id: its labelled residues}: what an evaluation must score, read from the
  records (chains longer than the tiny config's max_residues, 64, are read whole in
  ESM windows: data.eval_long_chains = 'whole')."""
  config = multihost_job.config(data_dir, False, 1)
  assert config.data.eval_long_chains == "whole"
  return {ex.id: int(np.sum(ex.node_label_mask))
          for path in pipeline.shard_files(data_dir, split)
          for ex in records.read_records(path)}


def test_evaluation_equal_and_every_protein_once(runs):
  for split in ("val", "test"):
    # The reference's final evaluation (1 process) and 2 processes' of the same
    # checkpoint.
    one, two = (json.load(open(os.path.join(runs[k], "eval", f"{split}.json")))
                for k in ("ref", "ref_copy"))
    assert one == two
    assert two["num_windowed_proteins"] == two["num_long_chain_proteins"] > 0
    items = np.load(os.path.join(runs["ref_copy"], "eval", f"{split}_predictions.npz"))
    rows = list(zip(items["example_id"], items["chain_row"], items["residue_index"]))
    assert len(rows) == len(set(rows)) == two["num_items"]  # no residue twice
    want = _labelled_residues(runs["data"], split)
    ids, counts = np.unique(items["example_id"], return_counts=True)
    assert dict(zip(ids.tolist(), counts.tolist())) == want  # each protein, whole
  assert len(_labelled_residues(runs["data"], "test")) % 2 == 1  # 2 hosts, odd


def test_predict_equal(runs):
  one, two = (np.load(runs["predictions"][k]) for k in (1, 2))
  assert sorted(one.files) == sorted(two.files)
  assert len(one["protein_ids"]) == len(multihost_job.PREDICT_CHAINS)  # > 1 per host
  for name in one.files:
    if one[name].dtype.kind in "fc":
      np.testing.assert_allclose(one[name], two[name], rtol=0, atol=1e-6, err_msg=name)
    else:
      np.testing.assert_array_equal(one[name], two[name], err_msg=name)


def test_a_failing_process_ends_the_others(tmp_path):
  start = time.time()
  proc = subprocess.run(
      [sys.executable, "-m", "launch.local", "--processes", "2", "--grace", "5",
       "--log-dir", str(tmp_path), "--", sys.executable, JOB, "--data", "-",
       "--fail-on-process", "1"], cwd=REPO, env=_env(), capture_output=True, text=True,
      timeout=120)
  assert proc.returncode == 3
  line = [s for s in proc.stdout.splitlines() if "stopping the other" in s]
  assert line == [f"launch.local: process 1 exited with status 3 (log: "
                  f"{tmp_path}/process1.log); stopping the other processes"]
  assert "[1] process 1 of 2 fails" in proc.stdout
  assert "process 1 of 2 fails" in open(tmp_path / "process1.log").read()
  assert time.time() - start < 60  # process 0 (sleeping 600 s) was stopped


def test_ablation_runs_each_command_as_one_job_of_several_processes():
  from launch import ablate  # pylint: disable=g-import-not-at-top
  run = ablate.plan_runs(ablate.sweep_variants("fusion_mode")[:1], [0], "/w",
                         "configs/demo.py:tiny", processes=2, devices_per_process=4)[0]
  for argv, entry in ((run.train_argv(), "bihier_jax.train"),
                      (run.eval_argv(), "bihier_jax.eval")):
    split = argv.index("--")
    assert argv[:split] == ["python", "-m", "launch.local", "--processes=2",
                            "--devices-per-process=4",
                            "--log-dir=/w/mode_local/seed0/launch_logs"]
    assert argv[split + 1:split + 4] == ["python", "-m", entry]
    assert "--config.train.multi_host=True" in argv
  one = ablate.plan_runs(ablate.sweep_variants("fusion_mode")[:1], [0], "/w",
                         "configs/demo.py:tiny")[0]
  assert one.train_argv()[:3] == ["python", "-m", "bihier_jax.train"]
  assert not any("multi_host" in a for a in one.train_argv())


@flax.struct.dataclass
class _Planned:
  """A stand-in for a packed batch: its place in the plan, and its budget."""
  index: np.ndarray
  budget: int = flax.struct.field(pytree_node=False)


class _Planner:
  """Planned batches of 3 budgets in a seeded order, epochs of 37 batches."""

  def stream(self, start_epoch=0, start_index=0):
    for index in itertools.count(start_index):
      epoch = start_epoch + (index - start_index) // 37
      budget = int(np.random.default_rng(index).integers(3))
      yield batch_plan.PlannedBatch(index, epoch, budget, np.array([index]),
                                    np.zeros([1], np.int32), np.zeros([1], np.int32),
                                    np.zeros([1], np.float32))


def _pack(planned):
  for b in planned:
    yield _Planned(np.array(b.index), b.budget), {"step": b.step, "index": b.index}


def test_steps_and_positions_do_not_depend_on_the_host_count():
  def hosts(count, position=None):
    per = 8 // count
    return [device_batches.StepInput(_Planner(), 8, slice(k * per, (k + 1) * per), position,
                               _pack) for k in range(count)]

  def steps(inputs, n):
    out = []
    for _ in range(n):
      parts = [next(i)[0] for i in inputs]
      assert len({p.budget for p in parts}) == 1  # a step is one budget
      out.append((np.concatenate([p.index for p in parts]).tolist(),
                  [i.position for i in inputs]))
    return out

  one, two = steps(hosts(1), 30), steps(hosts(2), 30)
  assert [s for s, _ in one] == [s for s, _ in two]
  assert all(p == [q[0]] * 2 for (_, q), (_, p) in zip(one, two))
  assert sorted(sum((s for s, _ in one), [])) != list(range(240))  # budgets wait
  # A position saved by either host count continues on the other.
  # Not vacuous: batches waiting for their budget's step, planning past epoch 0.
  k = next(i for i, (_, p) in enumerate(one[:20]) if p[0].pending and p[0].epoch > 0)
  for count in (1, 2):
    assert ([s for s, _ in steps(hosts(count, one[k][1][0]), 10)]
            == [s for s, _ in one[k + 1:k + 11]])
