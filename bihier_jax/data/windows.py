"""Overlapping ESM-2 windows: how a chain longer than one ESM row is read whole.

ESM-2 was trained on at most 1,022 residues per sequence. A chain of n residues longer
than a window of w residues is read as W = 1 + ⌈(n − w) / (w − w // 4)⌉ windows of w
residues, their starts spread evenly from 0 to n − w, so that neighbouring windows share
at least a quarter of a window (255 residues at w = 1,022). Each window is its own
`<cls> seq <eos>` run of the token grid. A residue reads its ESM state from the window
whose centre is nearest (the most context on both sides; the earlier on a tie), and
fusion writes its update to the residue's token in every window that holds it. Evenly
spread windows overlap by less than half a window, so a residue lies in at most three.

Public: `window_starts`, `residue_windows`, `chain_runs`, `window_for`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bihier_jax.common import residue_constants as rc


def window_starts(length: int, window: int) -> np.ndarray:
  """int64[W] first residue of each window of a chain of `length` residues ([0] if the
  chain fits one window)."""
  length, window = int(length), int(window)
  if window < 4:
    raise ValueError(f"a window of {window} residues is too small to overlap")
  if length <= window:
    return np.zeros([1], np.int64)
  stride = window - window // 4
  count = 1 + -(-(length - window) // stride)
  return np.round(np.linspace(0, length - window, count)).astype(np.int64)


def residue_windows(length: int, window: int) -> tuple[np.ndarray, np.ndarray]:
  """Every window that holds each residue of a chain, the one it reads first.

  Returns:
    (which int64[length, K], offset int64[length, K]): window index and the residue's
    position in it (0-based, before `<cls>`), K = the most windows one residue is in
    (1 for a chain that fits one window); column 0 is the window whose centre is
    nearest, the others follow in window order; -1 where a residue has fewer copies.
  """
  starts = window_starts(length, window)
  pos = np.arange(int(length))[:, None]
  inside = (pos >= starts[None]) & (pos < starts[None] + window)  # [n, W]
  centre = starts + (window - 1) / 2
  distance = np.where(inside, np.abs(pos - centre[None]), np.inf)
  first = np.argmin(distance, axis=1)  # argmin: the earlier window on a tie
  k = int(inside.sum(1).max(initial=1))
  which = np.full([int(length), k], -1, np.int64)
  which[:, 0] = first
  others = inside.copy()
  others[np.arange(int(length)), first] = False
  for j in range(1, k):
    has = others.any(1)
    nxt = np.argmax(others, axis=1)
    which[has, j] = nxt[has]
    others[np.arange(int(length))[has], nxt[has]] = False
  offset = np.where(which >= 0, pos - starts[np.maximum(which, 0)], -1)
  return which, offset


def chain_runs(lengths: Sequence[int], window: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The ESM runs of chains of these lengths: (chain, start, length) int64[S] each,
  chain by chain, windows in order; window 0 (no windows) or a chain that fits: one run
  of the whole chain."""
  chain, start, size = [], [], []
  for c, n in enumerate(int(v) for v in lengths):
    starts = window_starts(n, window) if window else np.zeros([1], np.int64)
    chain += [c] * len(starts)
    start += starts.tolist()
    size += [min(n, window) if window else n] * len(starts)
  return (np.asarray(chain, np.int64), np.asarray(start, np.int64),
          np.asarray(size, np.int64))


def window_for(max_residues: int, row_multiple: int) -> int:
  """Residues per window for chains longer than `max_residues`: rows of windowed
  batches are exactly window + 2 tokens, `max_residues` + 2 rounded up to
  `row_multiple` as the budgets' row lengths are (at most ESM-2's 1,024 positions)."""
  tokens = min(-(-(int(max_residues) + 2) // int(row_multiple)) * int(row_multiple),
               rc.ESM_MAX_TOKENS)
  if tokens - 2 < 4:
    raise ValueError(f"data.max_residues={max_residues} leaves windows of "
                     f"{tokens - 2} residues; use at least 4")
  return tokens - 2
