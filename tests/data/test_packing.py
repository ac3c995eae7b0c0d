"""Packed ESM rows: the packing rule, the packed `collate` layout, budgets, row length."""

import dataclasses

import jax
import ml_collections
import numpy as np
import pytest

from bihier_jax.common import flops
from bihier_jax.common import residue_constants as rc
from bihier_jax.data import input_pipeline
from bihier_jax.data import packing
from bihier_jax import testing
from bihier_jax.data.batch import PaddingBudget
from bihier_jax.models import esm2


def _random_sizes(rng, m, max_chains=3, max_tokens=60):
  num_chains = rng.integers(1, max_chains + 1, m)
  tokens = rng.integers(3, max_tokens + 1, int(num_chains.sum()))
  return rng.integers(1, 200, m), rng.integers(0, 3000, m), num_chains, tokens


def _check_first_fit(nodes, edges, num_chains, tokens, budget, plan):
  """The packed rule, checked from the plan's output alone, one example at a time."""
  first = np.concatenate([[0], np.cumsum(num_chains)])
  state = {}  # batch -> [nodes, edges, graphs, row fill [R]]
  assert plan.num_batches == len(set(plan.batch.tolist()))
  for i in range(len(nodes)):
    b = int(plan.batch[i])
    if b not in state:  # batches are numbered in the order they open
      assert b == len(state)
      state[b] = [0, 0, 0, np.zeros(budget.n_row, np.int64)]
    mine = range(first[i], first[i + 1])
    # It did not fit any batch opened before its own (single chain: the whole test).
    for other in range(b):
      n, e, g, fill = state[other]
      counts_fit = (n + nodes[i] < budget.n_node and e + edges[i] <= budget.n_edge
                    and g + 1 < budget.n_graph)
      if num_chains[i] == 1 and counts_fit:
        assert (budget.row_length - fill < tokens[first[i]]).all()
    n, e, g, fill = state[b]
    for c in mine:
      r, col, t = int(plan.row[c]), int(plan.column[c]), int(tokens[c])
      # First fit: the chain starts where its row's filled part ends, and no earlier
      # row had room for it.
      assert col == fill[r] and col + t <= budget.row_length
      assert (budget.row_length - fill[:r] < t).all()
      fill[r] += t
    state[b] = [n + nodes[i], e + edges[i], g + 1, fill]
  for n, e, g, _ in state.values():
    assert n < budget.n_node and e <= budget.n_edge and g < budget.n_graph


@pytest.mark.parametrize("seed", range(4))
def test_packed_plan_is_first_fit_in_example_order(seed):
  rng = np.random.default_rng(seed)
  nodes, edges, num_chains, tokens = _random_sizes(rng, 300)
  budget = PaddingBudget(n_node=900, n_edge=12000, n_graph=9, n_row=5, row_length=64,
                         packed_rows=True)
  plan = packing.plan_batches(nodes, edges, num_chains, tokens, budget)
  _check_first_fit(nodes, edges, num_chains, tokens, budget, plan)
  # Packing beats one chain per row on these sizes.
  unpacked = packing.plan_batches(nodes, edges, num_chains, tokens,
                                  dataclasses.replace(budget, packed_rows=False))
  assert plan.num_batches < unpacked.num_batches


def test_unpacked_plan_is_next_fit_one_chain_per_row():
  rng = np.random.default_rng(0)
  nodes, edges, num_chains, tokens = _random_sizes(rng, 200, max_tokens=40)
  limits = np.array([600, 12000, 6])
  budget = PaddingBudget(n_node=601, n_edge=12000, n_graph=5, n_row=6, row_length=40)
  plan = packing.plan_batches(nodes, edges, num_chains, tokens, budget)
  sizes = np.stack([nodes, edges, num_chains], 1)
  assert (np.diff(plan.batch) >= 0).all() and (plan.column == 0).all()
  for b in range(plan.num_batches):
    rows = sizes[plan.batch == b]
    assert len(rows) <= 4 and (rows.sum(0) <= limits).all()
    # Rows are the batch's chains in order.
    chain_batch = np.repeat(plan.batch, num_chains)
    np.testing.assert_array_equal(plan.row[chain_batch == b], np.arange(rows[:, 2].sum()))
    if b:  # a new batch starts only when the next example does not fit
      prev = sizes[plan.batch == b - 1]
      assert len(prev) == 4 or ((prev.sum(0) + rows[0]) > limits).any()


def test_plan_rejects_an_example_that_fits_alone_nowhere():
  budget = PaddingBudget(n_node=100, n_edge=100, n_graph=3, n_row=2, row_length=20,
                         graph_capacity=30, packed_rows=True)
  with pytest.raises(ValueError, match="ESM row length"):
    packing.plan_batches([5], [5], [1], [21], budget)
  with pytest.raises(ValueError, match="graph_capacity"):
    packing.plan_batches([31], [5], [1], [10], budget)


def _examples():
  return [testing.random_example(30, seed=0),
          testing.random_example(41, seed=1, n_chains=2),
          testing.random_example(12, seed=2, n_ligand=5),
          testing.random_example(9, seed=3, n_chains=3, n_ligand=2),
          testing.random_example(25, seed=4)]


def test_collate_packed_layout_matches_examples():
  exs = _examples()
  budget = PaddingBudget(n_node=160, n_edge=4096, n_graph=6, n_row=4, row_length=48,
                         graph_capacity=48, packed_rows=True)
  b = input_pipeline.collate(exs, budget)
  assert b.budget == budget and b.packed_rows
  nodes = b.graph.nodes
  vocab = np.array(rc.ESM_VOCAB)
  # Every chain is <cls> seq <eos> in one row; read the grid back run by run.
  chains = []  # (row, start, graph of its residues or None, sequence)
  for r in range(budget.n_row):
    seg = b.token_segments[r]
    assert ((seg == -1) == (b.tokens[r] == rc.ESM_PAD)).all()
    ids = seg[seg >= 0]
    np.testing.assert_array_equal(np.unique(ids), np.arange(len(np.unique(ids))))
    assert (np.diff(ids) >= 0).all()  # runs in column order, each id one run
    for s in np.unique(ids):
      cols = np.flatnonzero(seg == s)
      assert (np.diff(cols) == 1).all()
      run = b.tokens[r, cols]
      assert run[0] == rc.ESM_CLS and run[-1] == rc.ESM_EOS
      chains.append((r, cols[0], "".join(vocab[run[1:-1]])))
    assert b.row_mask[r] == bool(len(ids))
  want = sorted(s for ex in exs for s in ex.sequences)
  assert sorted(c[2] for c in chains) == want
  assert len(chains) == 8 and budget.n_row < len(chains)  # several chains share rows
  # Each residue's token is its own letter, in its own chain's run.
  res = b.node_mask & (nodes["node_kind"] == 0)
  letters = vocab[b.tokens[b.node_to_token[res, 0], b.node_to_token[res, 1]]]
  np.testing.assert_array_equal(
      letters, np.concatenate([[rc.RESTYPES[a] for a in ex.aatype] for ex in exs]))
  # chain_id: one per chain, distinct from the ligand ids; prev/next inside a chain.
  res_chain = nodes["chain_id"][res]
  assert len(np.unique(res_chain)) == 8 and (res_chain < budget.max_chains).all()
  lig = b.node_mask & (nodes["node_kind"] == 1)
  np.testing.assert_array_equal(np.unique(nodes["chain_id"][lig]),
                                budget.max_chains + np.array([2, 3]))
  chain = nodes["chain_id"]
  assert (chain[nodes["prev_node"]] == chain).all()
  # A chain's residues share its run: same row, same segment id.
  seg_of_res = b.token_segments[b.node_to_token[res, 0], b.node_to_token[res, 1]]
  for c in np.unique(res_chain):
    here = res_chain == c
    assert len(set(zip(b.node_to_token[res, 0][here].tolist(),
                       seg_of_res[here].tolist()))) == 1
  # row_graph: the protein of a row's chains, -1 when a row mixes proteins.
  graph_of_chain = {}
  for c in np.unique(res_chain):
    graph_of_chain[c] = int(b.node_graph[res][res_chain == c][0])
  for r in range(budget.n_row):
    owners = {graph_of_chain[c] for c in np.unique(res_chain[b.node_to_token[res, 0] == r])}
    want_g = budget.n_graph - 1 if not owners else (owners.pop() if len(owners) == 1
                                                    else -1)
    assert b.row_graph[r] == want_g
  assert (b.row_graph == -1).any()
  # graph_slot_node lists each graph's nodes, in order, then -1.
  for g in range(budget.n_graph - 1):
    want_nodes = np.flatnonzero((b.node_graph == g) & b.node_mask)
    got = b.graph_slot_node[g]
    np.testing.assert_array_equal(got[:len(want_nodes)], want_nodes)
    assert (got[len(want_nodes):] == -1).all()


def test_collate_unpacked_has_one_segment_per_row():
  exs = _examples()
  budget = input_pipeline.budget_for(exs, graph_multiple=16)
  b = input_pipeline.collate(exs, budget)
  assert not b.packed_rows and budget.graph_capacity == 48
  np.testing.assert_array_equal(b.token_segments, np.where(b.tokens == rc.ESM_PAD, -1, 0))
  assert (b.tokens[:, 0] == rc.ESM_CLS).all()
  np.testing.assert_array_equal(b.row_graph, [0, 1, 1, 2, 3, 3, 3, 4])


def test_packed_budget_for_and_fits():
  exs = _examples()
  budget = input_pipeline.budget_for(exs, packed_rows=True)
  assert budget.row_length == 32 and budget.packed_rows
  assert budget.n_row < sum(len(ex.sequences) for ex in exs)
  assert input_pipeline.fits(exs, budget) is None
  fewer = dataclasses.replace(budget, n_row=budget.n_row - 1)
  assert "first-fit" in input_pipeline.fits(exs, fewer)
  with pytest.raises(ValueError, match="do not fit"):
    input_pipeline.collate(exs, fewer)


def test_residue_chain_rows_are_recovered_from_packed_chain_ids():
  """eval records each residue's chain row within its protein from chain_id."""
  from bihier_jax.training import evaluation  # pylint: disable=g-import-not-at-top
  exs = _examples()
  budget = input_pipeline.budget_for(exs, packed_rows=True, node_multiple=8)
  batch = input_pipeline.collate(exs, budget)
  mask = (batch.node_label_mask > 0) & batch.node_mask
  chain_row, residue_index = evaluation._residue_positions(  # pylint: disable=protected-access
      batch, mask)
  np.testing.assert_array_equal(chain_row, np.concatenate([ex.chain_row for ex in exs]))
  np.testing.assert_array_equal(residue_index,
                                np.concatenate([ex.residue_index for ex in exs]))


# --- budgets and the row length -----------------------------------------------------------

def _config(pack_rows=True, row_length=0, batch_size=8, preset="t6_8M"):
  c = ml_collections.ConfigDict()
  c.data = ml_collections.ConfigDict(dict(
      max_residues=1022, length_buckets=(128, 256, 512, 1024), max_neighbors=32,
      pack_rows=pack_rows, row_length=row_length))
  c.train = ml_collections.ConfigDict(dict(batch_size=batch_size))
  c.model = ml_collections.ConfigDict(dict(esm=dict(preset=preset)))
  return c


def _lognormal_sizes(n, seed=0):
  """sizes.json rows of PDB-like single chains (`testing.pdb_like_lengths`)."""
  lengths = testing.pdb_like_lengths(n, seed)
  return np.stack([lengths, lengths, np.ones_like(lengths), 12 * lengths], 1)


def test_unpacked_budgets_are_the_length_buckets_of_before():
  """pack_rows=False: the budgets of commit cf27909 (before packing), plus P."""
  budgets = input_pipeline.bucket_budgets(_config(pack_rows=False), _lognormal_sizes(3000))
  got = [(b.n_node, b.n_edge, b.n_graph, b.n_row, b.row_length, b.packed_rows)
         for b in budgets]
  assert got == [(640, 7680, 9, 8, 128, False), (1408, 16896, 9, 8, 256, False),
                 (2560, 30720, 9, 8, 512, False), (5120, 90240, 9, 8, 1024, False)]
  assert [b.graph_capacity for b in budgets] == [128, 256, 512, 1504]


def test_packed_budgets_admit_every_example_within_its_graph_capacity():
  sizes = _lognormal_sizes(3000)
  config = _config(row_length=384)
  budgets = input_pipeline.bucket_budgets(config, sizes)
  assert [b.row_length for b in budgets] == [384, 512, 1024]
  assert all(b.packed_rows for b in budgets) and len(set(budgets)) <= 8
  cropped, long = packing.cropped_sizes(sizes, 1022)
  bucket = packing.assign_buckets(cropped, long, budgets)
  for k, b in enumerate(budgets):
    mine = sizes[bucket == k]
    assert len(mine)
    if b.graph_capacity:  # at least every admitted protein, uncropped
      assert mine[:, 0].max() <= b.graph_capacity
      assert b.n_graph - 1 < (b.n_node / b.graph_capacity) ** 2
    else:
      assert (b.n_graph - 1) * (2 * mine[:, 0].max()) ** 2 >= (2 * b.n_node) ** 2


def test_layer_flops_match_the_counted_esm_layer():
  """`flops.esm_matmul_flops` x token slots == jaxpr-counted matmul FLOPs of one ESM-2 layer."""
  cfg = esm2.config_from_preset("tiny", mlm_head=False, num_layers=1, attention="exact")
  rows, length = 3, 20
  tokens = np.full((rows, length), 5, np.int32)
  tokens[:, 0], tokens[:, -1] = rc.ESM_CLS, rc.ESM_EOS
  model = esm2.ESM2(cfg)
  params = model.init(jax.random.PRNGKey(0), tokens, output_hidden_states=False)
  counted = flops.matmul_flops(
      lambda p: model.apply(p, tokens, output_hidden_states=False), params)
  assert counted == rows * length * flops.esm_matmul_flops(length, cfg.embed_dim,
                                                             cfg.ffn_dim)


def _one_length(residues, n=870):
  # 870 = 29 x 30: full batches of 29 or 30 proteins (29 rows of 256, 10 rows of 768 or
  # 1024), so a part-filled last batch does not decide.
  return np.tile([[residues, residues, 1, 12 * residues]], (n, 1))


@pytest.mark.parametrize("residues, embed_dim, ffn_dim, want", [
    # 256 tokens fill a 256 row exactly: longer rows only add attention.
    (254, 10_000, 40_000, 256), (254, 8, 0, 256),
    # 302 tokens: 3 per 1024 row (88% full) beats 2 per 768 or 1 per 384 (79%) when
    # dense work dominates; when attention dominates, one per 384 row is cheapest.
    (300, 10_000, 40_000, 1024), (300, 8, 0, 384),
])
def test_row_length_choice_on_sizes_with_a_known_answer(residues, embed_dim, ffn_dim,
                                                        want):
  got = input_pipeline.choose_row_length(_one_length(residues), embed_dim, ffn_dim,
                                         batch_size=32)
  assert got == want


def test_config_row_length_zero_chooses_for_the_preset_and_a_value_forces_it():
  sizes = _lognormal_sizes(2000)
  big = input_pipeline.bucket_budgets(_config(preset="t36_3B", batch_size=32), sizes)
  assert big[0].row_length == input_pipeline.choose_row_length(
      sizes, 2560, 10240, batch_size=32)
  forced = input_pipeline.bucket_budgets(_config(row_length=256), sizes)
  assert [b.row_length for b in forced] == [256, 512, 1024]
