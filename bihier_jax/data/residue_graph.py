"""Radius graph over residues (by Cα) and ligand atoms, built with a k-d tree.

ProNet's reference (torch_cluster.radius_graph, max_num_neighbors=32) keeps the first 32
neighbours the search happens to find, not the nearest; we keep the nearest ≤ k within the
cutoff, so the graph does not depend on search order. All pairs within the cutoff come
from a k-d tree (scipy cKDTree.query_pairs); sorting and truncation are vectorised numpy.
Edges are directed, messages flow sender -> receiver, there are no self edges, and the
order is deterministic: by receiver, then distance, then sender index.
"""

from __future__ import annotations

import numpy as np
from scipy import spatial


def radius_graph(positions: np.ndarray, cutoff: float = 10.0, max_neighbors: int = 32,
                 valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Nearest ≤ max_neighbors senders within `cutoff` of each receiver.

  Args:
    positions: [n, 3] node positions in Å (Cα for residues).
    cutoff: neighbour radius in Å (inclusive).
    max_neighbors: most incoming edges per receiver.
    valid: optional bool[n]; invalid nodes neither send nor receive.

  Returns:
    (senders int32[e], receivers int32[e]), sorted by receiver, then distance, then
    sender index.
  """
  positions = np.asarray(positions, np.float64).reshape(-1, 3)
  n = positions.shape[0]
  nodes = np.arange(n) if valid is None else np.flatnonzero(np.asarray(valid, bool))
  empty = np.zeros([0], np.int32)
  if nodes.size < 2 or max_neighbors <= 0:
    return empty, empty.copy()
  points = positions[nodes]
  # All pairs within the cutoff (slightly enlarged; the exact ≤ test is below).
  pairs = spatial.cKDTree(points).query_pairs(cutoff * (1 + 1e-6) + 1e-6,
                                             output_type="ndarray")
  i, j = pairs[:, 0], pairs[:, 1]
  # Distances recomputed in float64 here, so that the order and the cutoff are exact.
  dist = np.sqrt(np.sum((points[i] - points[j]) ** 2, axis=-1))
  keep = dist <= cutoff
  i, j, dist = i[keep], j[keep], dist[keep]
  receivers = np.concatenate([i, j])
  senders = np.concatenate([j, i])
  dist = np.concatenate([dist, dist])
  order = _order_by_receiver_distance_sender(receivers, dist, senders)
  receivers, senders = receivers[order], senders[order]
  # Rank of each edge within its receiver's list; keep the first max_neighbors.
  counts = np.bincount(receivers, minlength=nodes.size)
  starts = np.cumsum(counts) - counts
  rank = np.arange(receivers.size) - np.repeat(starts, counts)
  keep = rank < max_neighbors
  return (nodes[senders[keep]].astype(np.int32), nodes[receivers[keep]].astype(np.int32))


def _order_by_receiver_distance_sender(receivers, dist, senders):
  """Permutation sorting edges by (receiver, distance, sender), exactly.

  Three stable integer/float argsorts; several times faster than np.lexsort here.
  """
  by_sender = np.argsort(senders, kind="stable")
  by_dist_sender = by_sender[np.argsort(dist[by_sender], kind="stable")]
  dist_rank = np.empty_like(by_dist_sender)
  dist_rank[by_dist_sender] = np.arange(by_dist_sender.size)
  return np.argsort(receivers.astype(np.int64) * by_dist_sender.size + dist_rank)
