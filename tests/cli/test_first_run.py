"""The first real run, as a new user makes it, on stand-ins for the real things:

- pretrained ESM-2 weights: a random Hugging Face `EsmModel` of a size that is no preset
  (2 layers x 32 wide), named only by its path: the preset is read from the checkpoint;
- a bucket: records and weights copied to another folder and read through `file://`
  URLs, the same tf.io.gfile layer that reads `gs://` (gcsfs is not installed here);
- two devices with FSDP (`train.fsdp=2`), then evaluation on one;
- Ctrl-C (SIGINT) mid-run: a checkpoint of the interrupted step and one line saying
  so, exit status 0; the same command resumes from that step.

Subprocesses share the session's XLA compilation cache (conftest). Cost: three
subprocesses (two training starts, one evaluation; tiny model, 6 steps), about 90 s of
CPU time measured on the shared 2-core VM (4.5 min wall at load average 8).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest


from bihier_jax.training import checkpointing
from tests.paths import REPO

PRESET = "L2_D32_H4_F64"  # the checkpoint's architecture: no released size


@pytest.fixture(scope="module")
def bucket(tmp_path_factory, demo_data):
  """A folder standing in for gs://bucket: records/ and esm2/ (HF layout)."""
  os.environ.setdefault("USE_TF", "0")
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  root = tmp_path_factory.mktemp("bucket")
  shutil.copytree(demo_data, root / "records")
  torch.manual_seed(0)
  model = transformers.EsmModel(transformers.EsmConfig(
      vocab_size=33, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=64, position_embedding_type="rotary", token_dropout=True,
      emb_layer_norm_before=False, mask_token_id=32, pad_token_id=1,
      max_position_embeddings=1026), add_pooling_layer=False)
  model.save_pretrained(root / "esm2")
  return root


def _env(devices=1):
  flags = os.environ.get("XLA_FLAGS", "")
  if devices > 1:
    flags += f" --xla_force_host_platform_device_count={devices}"
  return dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", XLA_FLAGS=flags.strip(),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def _logged_steps(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  steps = []
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:  # a line being written
        continue
      if "train/loss" in row:
        steps.append(row["step"])
  return steps


def test_pretrained_weights_from_a_bucket_fsdp_interrupt_resume_evaluate(
    bucket, tmp_path):
  workdir = str(tmp_path / "run")
  train = [sys.executable, "-m", "bihier_jax.train", "--config",
           "configs/demo.py:tiny", "--workdir", workdir,
           f"--config.data.dir=file://{bucket}/records",
           f"--config.model.esm.checkpoint=file://{bucket}/esm2",
           "--config.train.fsdp=2", "--config.model.esm.remat=True",
           "--config.train.num_steps=6",
           "--config.train.eval_every=100", "--config.train.checkpoint_every=100",
           "--config.train.log_every=1"]

  # 1) Ctrl-C once a few steps are done: the interrupted step is saved.
  proc = subprocess.Popen(train, cwd=REPO, env=_env(2), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  end = time.time() + 600
  while proc.poll() is None and max(_logged_steps(workdir), default=0) < 2:
    assert time.time() < end, "no training step within 10 minutes"
    time.sleep(0.05)
  proc.send_signal(signal.SIGINT)
  _, stderr = proc.communicate(timeout=600)
  assert proc.returncode == 0, stderr[-3000:]
  assert "Traceback" not in stderr
  assert (f"model.esm.preset={PRESET} read from model.esm.checkpoint=file://{bucket}/"
          "esm2 (2 layers x 32 wide, 4 heads; the config file said tiny)") in stderr
  assert f"ESM weights loaded from file://{bucket}/esm2" in stderr
  assert "mesh data=1 x fsdp=2 over 2 device(s)" in stderr
  stopped = max(_logged_steps(workdir))
  assert stopped < 6, "the run ended before it was interrupted"
  assert (f"stopped by SIGINT at step {stopped}: checkpoint {stopped} saved in "
          f"{workdir}/checkpoints; the same command resumes from it") in stderr
  with checkpointing.Checkpointer(workdir, read_only=True) as ckpt:
    assert ckpt.latest_step() == stopped
  saved = json.load(open(os.path.join(workdir, "config.json")))
  assert saved["model"]["esm"]["preset"] == PRESET

  # 2) The same command resumes from that step and finishes.
  done = subprocess.run(train, cwd=REPO, env=_env(2), capture_output=True, text=True,
                        timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert f"resumed from checkpoint {stopped} " in done.stderr
  assert sorted(_logged_steps(workdir)) == list(range(1, 7))  # each step once
  trained = json.load(open(os.path.join(workdir, "eval", "test.json")))

  # 3) Evaluation on the one device here, where train.fsdp=2 cannot split (predict
  # always runs on one device: tests/training/test_train.py).
  evaluated = subprocess.run([sys.executable, "-m", "bihier_jax.eval", "--workdir",
                              workdir], cwd=REPO, env=_env(), capture_output=True,
                             text=True, timeout=600)
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert "evaluating on the 1 device(s) here: train.fsdp 2 -> 1" in evaluated.stderr
  again = json.load(open(os.path.join(workdir, "eval", "test.json")))
  assert again["step"] == trained["step"]
  for name in ("accuracy", "loss"):
    np.testing.assert_allclose(again[name], trained[name], rtol=0, atol=1e-5)



# --- predict's inputs (no JAX) ------------------------------------------------------------

def _pdb_lines(chain="A", shift=0.0):
  import gzip  # pylint: disable=g-import-not-at-top
  from data_pipelines import demo as demo_raw  # pylint: disable=g-import-not-at-top
  path = os.path.join(demo_raw.default_raw_dir(), "1ahsA.pdb.gz")
  with gzip.open(path, "rt") as f:
    lines = [l for l in f.read().splitlines() if l.startswith("ATOM")]
  return [l[:21] + chain + l[22:30] + f"{float(l[30:38]) + shift:8.3f}" + l[38:]
          for l in lines]


def test_files_sharing_a_stem_keep_apart_and_multi_chain_input_is_named(tmp_path):
  import gzip  # pylint: disable=g-import-not-at-top
  from bihier_jax.data import from_files  # pylint: disable=g-import-not-at-top
  folder = tmp_path / "in"
  (folder / "other").mkdir(parents=True)
  one = "\n".join(_pdb_lines()) + "\nEND\n"
  for name in ("1BD2.pdb.gz", "1BD2.cif.gz", "other/1BD2.cif.gz"):  # read by content
    with gzip.open(folder / name, "wt") as f:
      f.write(one)
  (folder / "dimer.pdb").write_text("\n".join(_pdb_lines("A") + ["TER"] +
                                              _pdb_lines("B", 60.0)) + "\nEND\n")
  loaded = from_files.load(from_files.expand(str(folder)))
  assert [ex.id for ex in loaded.examples] == [
      "1BD2.cif", "1BD2.pdb", "dimer", "other/1BD2.cif"]
  assert loaded.notes == ["3 files share the name 1BD2: their proteins are named "
                          "1BD2.cif, 1BD2.pdb, other/1BD2.cif"]
  per_chain = from_files.load([str(folder / "1BD2.pdb.gz"),
                                     str(folder / "1BD2.cif.gz")], per_chain=True)
  assert [ex.id for ex in per_chain.examples] == ["1BD2.pdb_A", "1BD2.cif_A"]

  # A model trained on single chains (metadata.json: max_chains 1) gets the dimer whole.
  records = tmp_path / "records"
  records.mkdir()
  (records / "metadata.json").write_text(json.dumps(
      {"splits": {"train": {"max_chains": 1}, "val": {"max_chains": 1}}}))
  note = from_files.multi_chain_note(loaded, str(records), per_chain=False)
  assert note == ("1 protein(s) have several chains (e.g. dimer: chains A, B), each "
                  "predicted as ONE protein, but the model was trained on single chains: "
                  "pass --per_chain (one protein per chain) or --chains ID")
  assert from_files.multi_chain_note(loaded, str(records), per_chain=True) is None
  assert from_files.multi_chain_note(loaded, str(tmp_path / "gone"), False) is None
