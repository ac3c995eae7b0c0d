"""The global batch plan's inputs and its epochs (`bihier_jax.data.batch_plan`).

The record index is read from the records' wire format by hand; it is checked against
the same records decoded by TensorFlow's protobuf classes and against sizes.json
(written by the preprocessing). Budget: a few seconds.
"""

import numpy as np
import pytest

from bihier_jax.data import batch_plan
from bihier_jax.data import budgets as budgets_lib
from bihier_jax.data import pipeline
from bihier_jax.data import records
from bihier_jax import testing
from configs import demo
from data_pipelines import shards
from data_pipelines.tasks import WorkItem


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """30 records over 4 files: single chains, two-chain complexes, ligands."""
  root = str(tmp_path_factory.mktemp("plan_records"))
  rng = np.random.default_rng(1)
  items = [WorkItem(source=f"p{i:02d}", split="train",
                    payload=(int(rng.integers(8, 90)), i, 2 if i % 5 == 0 else 1,
                             4 if i % 7 == 0 else 0)) for i in range(30)]
  shards.write_dataset(items, testing.synthetic_process, root, num_workers=1,
                       shard_size=8, progress=False)
  return root


def test_record_index_matches_the_records(data_dir):
  files = pipeline.shard_files(data_dir, "train")
  index = batch_plan.record_index(files)
  examples = [ex for path in files for ex in records.read_records(path)]
  assert len(index) == len(examples) == 30 and len(index.files) == 4
  np.testing.assert_array_equal(index.residues, [ex.num_residues for ex in examples])
  np.testing.assert_array_equal(index.ligands, [len(ex.ligand_elements) for ex in examples])
  np.testing.assert_array_equal(index.edges, [ex.num_edges for ex in examples])
  np.testing.assert_array_equal(index.chains, [len(ex.sequences) for ex in examples])
  np.testing.assert_array_equal(index.chain_length,
                                [len(s) for ex in examples for s in ex.sequences])
  np.testing.assert_array_equal(index.max_in_degree,
                                [np.bincount(ex.receivers).max() for ex in examples])
  assert index.chains.max() == 2 and index.ligands.max() > 0  # not vacuous
  # Against sizes.json, record by record: (nodes, longest chain, chains, edges).
  sizes = budgets_lib.load_sizes(data_dir, "train")
  longest = [max(len(s) for s in ex.sequences) for ex in examples]
  np.testing.assert_array_equal(
      sizes, np.stack([index.residues + index.ligands, longest, index.chains,
                       index.edges], 1))
  # Read by offset, in any order, a record is itself.
  for i in (29, 3, 17):
    assert records.deserialize_example(index.read([i])[0]).id == examples[i].id


def test_every_record_once_per_epoch_and_crops_planned_whole(data_dir):
  config = demo.get_config("tiny")  # max_residues 64: the longer chains are cropped
  config.train.batch_size = 3
  planner = pipeline.make_planner(data_dir, "train", config, training=True,
                                        seed=5, chunk_size=8)
  epochs = {}
  for b in planner.stream():
    if b.epoch == 3:
      break
    epochs.setdefault(b.epoch, []).extend(b.records.tolist())
    budget = planner.budgets[b.budget]
    assert len(b.records) <= budget.n_graph - 1
    tokens = planner.tokens[np.concatenate([np.arange(planner.index.chain_first[r],
                                                      planner.index.chain_first[r + 1])
                                            for r in b.records])]
    assert (b.column + tokens <= budget.row_length).all()  # every chain in its row
    # A window is drawn for the chains of cropped records only, in [0, 1).
    cropped = np.repeat(planner.long[b.records], planner.index.chains[b.records])
    assert (b.crop[~cropped] == 0).all() and ((b.crop >= 0) & (b.crop < 1)).all()
  assert all(sorted(r) == list(range(30)) for r in epochs.values())
  assert epochs[0] != epochs[1]  # a new order each epoch
  assert planner.long.any() and (~planner.long).any()
