"""Inputs of the ESM-2 benches: random token rows, PDB-like chains, and chains laid out
in rows by the production packer (`packing.plan_batches`), as the input pipeline does.

random_tokens(batch, length, seed), chain_lengths(n, seed), row_batches(chains,
members, row_length, n_row, packed), packed_rows(chains, row_length, buckets).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from bihier_jax import testing
from bihier_jax.common import residue_constants as rc
from bihier_jax.data import packing
from bihier_jax.data.batch import PaddingBudget

Grid = tuple[np.ndarray, np.ndarray, list]


def random_tokens(batch: int, length: int, seed: int = 0) -> np.ndarray:
  """<cls> random residues <eos>, no padding. int32 [batch, length]."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(rc.ESM_TOKEN["L"], rc.ESM_TOKEN["C"] + 1, (batch, length)).astype(np.int32)
  tokens[:, 0], tokens[:, -1] = rc.ESM_CLS, rc.ESM_EOS
  return tokens


def chain_lengths(n: int, seed: int = 0) -> np.ndarray:
  """PDB-like chain lengths (`testing.pdb_like_lengths`) cropped to ESM-2's residues."""
  return testing.pdb_like_lengths(n, seed, clip=(30, rc.ESM_MAX_RESIDUES))


def row_batches(chains: Sequence[np.ndarray], members: Sequence[int], row_length: int,
                n_row: int, packed: bool) -> list[Grid]:
  """chains[members] (token arrays with <cls>/<eos>), in that order, in the batches of
  `n_row` rows of `row_length` that `packing.plan_batches` makes (packed: first fit,
  several chains per row; else one chain per row): per batch (tokens int32[R, L],
  segments int32[R, L] (-1 at padding), [(chain, row, column)]), empty rows dropped."""
  tokens = np.array([len(chains[i]) for i in members], np.int64)
  budget = PaddingBudget(n_node=int(tokens.sum()) + 1, n_edge=0, n_graph=len(members) + 1,
                         n_row=n_row, row_length=row_length, packed_rows=packed)
  plan = packing.plan_batches(tokens, np.zeros_like(tokens), np.ones_like(tokens), tokens,
                              budget)
  out = []
  for b in range(plan.num_batches):
    placed = np.flatnonzero(plan.batch == b)
    rows = int(plan.row[placed].max()) + 1
    tok = np.full((rows, row_length), rc.ESM_PAD, np.int32)
    seg = np.full((rows, row_length), -1, np.int32)
    in_row = np.zeros(rows, np.int32)  # segment id: the chain's place in its row
    where = []
    for k in placed.tolist():
      i, r, col = members[k], int(plan.row[k]), int(plan.column[k])
      tok[r, col:col + len(chains[i])] = chains[i]
      seg[r, col:col + len(chains[i])] = in_row[r]
      in_row[r] += 1
      where.append((i, r, col))
    out.append((tok, seg, where))
  return out


def packed_rows(chains: Sequence[np.ndarray], row_length: int,
                buckets: Sequence[int] = ()) -> list[tuple[int, Grid]]:
  """[(row length, grid)], one packed batch per row length, ascending: chains whose
  tokens fit `row_length` share its rows, longer ones go into the smallest bucket above
  that holds them; longest chain first (first fit decreasing)."""
  lengths = np.array([len(c) for c in chains])
  home: dict[int, list[int]] = {}
  for i in np.argsort(-lengths, kind="stable").tolist():
    length = next(b for b in (row_length, *sorted(buckets)) if b >= lengths[i])
    home.setdefault(length, []).append(i)
  return [(length, row_batches(chains, members, length, len(members), packed=True)[0])
          for length, members in sorted(home.items())]
