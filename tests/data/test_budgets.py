"""Padding budgets: the budget rule, the packing row length and its FLOP count."""

import jax
import ml_collections
import numpy as np
import pytest

from bihier_jax import testing
from bihier_jax.common import flops
from bihier_jax.common import residue_constants as rc
from bihier_jax.data import budgets as budgets_lib
from bihier_jax.data import packing
from bihier_jax.models import esm2


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
  budgets = budgets_lib.bucket_budgets(_config(pack_rows=False), _lognormal_sizes(3000))
  got = [(b.n_node, b.n_edge, b.n_graph, b.n_row, b.row_length, b.packed_rows)
         for b in budgets]
  assert got == [(640, 7680, 9, 8, 128, False), (1408, 16896, 9, 8, 256, False),
                 (2560, 30720, 9, 8, 512, False), (5120, 90240, 9, 8, 1024, False)]
  assert [b.graph_capacity for b in budgets] == [128, 256, 512, 1504]


def test_packed_budgets_admit_every_example_within_its_graph_capacity():
  sizes = _lognormal_sizes(3000)
  config = _config(row_length=384)
  budgets = budgets_lib.bucket_budgets(config, sizes)
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
  got = budgets_lib.choose_row_length(_one_length(residues), embed_dim, ffn_dim,
                                      batch_size=32)
  assert got == want


def test_config_row_length_zero_chooses_for_the_preset_and_a_value_forces_it():
  sizes = _lognormal_sizes(2000)
  big = budgets_lib.bucket_budgets(_config(preset="t36_3B", batch_size=32), sizes)
  assert big[0].row_length == budgets_lib.choose_row_length(
      sizes, 2560, 10240, batch_size=32)
  forced = budgets_lib.bucket_budgets(_config(row_length=256), sizes)
  assert [b.row_length for b in forced] == [256, 512, 1024]
