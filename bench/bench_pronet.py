"""Training throughput of the ProNet-style encoder on real chains.

Forward + backward + Adam on one device, backbone level, default size (4 blocks × 128,
cutoff 10 Å, ≤ 32 neighbours), node-level 3-class secondary-structure loss (DSSP labels
that ship with MDAnalysisTests). Reports residues/s for batches of 8 and 32 proteins and
step time against the node budget.

  python bench/bench_pronet.py [--quick] [--json PATH] [--receivers_sorted 0|1]

Reference PyTorch ProNet (DIG, with torch_scatter/torch_cluster) on the project's 2-core
CPU: about 4,800 residues/s (8 proteins) and 3,800 residues/s (32 proteins), per the
issue text; not installable here (needs torch_geometric <= 2.7 and compiled extensions).

Results, with the machines they ran on, are in BENCHMARKS.md ("ProNet encoder"). The
host allocator setting (`bihier_jax.common.host`, applied below) changes them by ~1.6x.
"""

from __future__ import annotations

import argparse
import functools
import glob
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import common  # noqa: E402  # pylint: disable=wrong-import-position

common.setup(jax_platforms="cpu")

import flax.linen as nn  # pylint: disable=g-import-not-at-top
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bihier_jax.data import example as example_lib
from bihier_jax.data import layout
from bihier_jax.models import pronet

_SS_CLASSES = {"H": 0, "G": 0, "I": 0, "E": 1, "B": 1}
# DIG ProNet (PyTorch) residues/s on the project's 2-core CPU, from the issue text.
REFERENCE_RESIDUES_PER_S = {8: 4800.0, 32: 3800.0}


def load_chains() -> list:
  """Every MDAnalysisTests DSSP chain (49, 79–173 residues) with 3-class labels."""
  import MDAnalysisTests  # pylint: disable=g-import-not-at-top
  from bihier_jax.data import featurize  # pylint: disable=g-import-not-at-top
  folder = os.path.join(os.path.dirname(MDAnalysisTests.__file__), "data", "dssp")
  examples = []
  for path in sorted(glob.glob(os.path.join(folder, "*.pdb.gz"))):
    dssp_path = path[:-3] + ".dssp"
    if not os.path.exists(dssp_path):
      continue
    with open(dssp_path) as f:
      dssp = f.readline().split()[0]
    labels = np.array([_SS_CLASSES.get(c, 2) for c in dssp], np.float32)
    (example,) = featurize.examples_from_file(path, per_chain=False, node_labels=labels)
    if example.num_residues == len(dssp):
      examples.append(example)
  if not examples:
    raise RuntimeError(f"no DSSP chains found in {folder}")
  return examples


_CACHED_FIELDS = ("aatype", "atom_positions", "atom_mask", "chain_row", "residue_index",
                  "residue_number", "insertion_code", "backbone_dihedrals",
                  "sidechain_torsions", "chi_mask", "senders", "receivers", "node_labels",
                  "node_label_mask", "node_weights", "chain_ids", "sequences")


def save_chains(examples, path: str):
  """Arrays of every chain in one .npz (no pickle), for machines without the parser."""
  arrays = {f"{i}/{name}": np.asarray(getattr(ex, name))
            for i, ex in enumerate(examples) for name in _CACHED_FIELDS}
  arrays.update({f"{i}/id": np.asarray(ex.id) for i, ex in enumerate(examples)})
  np.savez(path, **arrays)


def load_saved_chains(path: str) -> list:
  with np.load(path, allow_pickle=False) as data:
    count = len({key.split("/")[0] for key in data.files})
    examples = []
    for i in range(count):
      fields = {name: data[f"{i}/{name}"] for name in _CACHED_FIELDS}
      fields["chain_ids"] = [str(c) for c in fields["chain_ids"]]
      fields["sequences"] = [str(c) for c in fields["sequences"]]
      examples.append(example_lib.ProteinExample(id=str(data[f"{i}/id"]), **fields))
  return examples


class NodeTagger(nn.Module):
  """Encoder + per-residue linear head."""
  config: pronet.ProNetConfig

  @nn.compact
  def __call__(self, graph, deterministic=False):
    nodes = pronet.ProNet(self.config, name="gnn")(graph, deterministic=deterministic).nodes
    return nn.Dense(3)(nodes)


def make_step(model, tx):
  def loss_fn(params, batch, rng):
    logits = model.apply({"params": params}, batch.graph, deterministic=False,
                         rngs={"dropout": rng})
    labels = batch.node_labels.astype(jnp.int32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.sum(loss * batch.node_label_mask) / jnp.maximum(batch.node_label_mask.sum(), 1)

  @jax.jit
  def step(params, opt_state, batch, rng):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def time_batch(cfg, batch, steps: int, repeats: int = 3) -> dict:
  """Median seconds per training step (after compilation) on one padded batch."""
  model = NodeTagger(cfg)
  batch = jax.device_put(batch)
  params = jax.jit(functools.partial(model.init, deterministic=True))(
      jax.random.PRNGKey(0), batch.graph)["params"]
  tx = optax.adam(5e-4)
  opt_state = tx.init(params)
  step = make_step(model, tx)
  rng = jax.random.PRNGKey(1)
  start = time.perf_counter()
  params, opt_state, loss = step(params, opt_state, batch, rng)
  loss.block_until_ready()
  compile_s = time.perf_counter() - start
  per_step, cpu_per_step = [], []
  for _ in range(repeats):
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
      params, opt_state, loss = step(params, opt_state, batch, rng)
    loss.block_until_ready()
    per_step.append((time.perf_counter() - start) / steps)
    cpu_per_step.append((time.process_time() - cpu_start) / steps)
  residues = int(np.asarray(batch.node_mask).sum())
  sec = float(np.median(per_step))
  return {"residues": residues, "n_node": int(batch.node_mask.shape[0]),
          "n_edge": int(batch.edge_mask.shape[0]),
          "real_edges": int(np.asarray(batch.edge_mask).sum()),
          "step_ms": 1e3 * sec, "residues_per_s": residues / sec,
          # CPU-seconds of this process per step (all threads): the work, when other
          # processes share the cores and wall time is inflated.
          "cpu_ms": 1e3 * float(np.median(cpu_per_step)),
          "compile_s": compile_s, "loss": float(loss)}


def fill(chains, n_node: int, start: int = 0):
  """Chains (cycling from `start`) until the next would overflow n_node − 1 nodes."""
  picked, total, i = [], 0, start
  while total + chains[i % len(chains)].num_residues <= n_node - 1:
    picked.append(chains[i % len(chains)])
    total += picked[-1].num_residues
    i += 1
  return picked


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="fewer steps and sizes")
  parser.add_argument("--json", default="", help="write results here")
  parser.add_argument("--receivers_sorted", type=int, default=1,
                      help="collated batches have receivers sorted (layout.collate)")
  parser.add_argument("--level", default="backbone")
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--steps", type=int, default=0, help="timed steps per repeat")
  parser.add_argument("--repeats", type=int, default=0, help="timed repeats (median)")
  parser.add_argument("--chains", default="",
                      help=".npz of parsed chains: read if it exists, else written")
  args = parser.parse_args()

  if args.chains and os.path.exists(args.chains):
    chains = load_saved_chains(args.chains)
  else:
    chains = load_chains()
    if args.chains:
      save_chains(chains, args.chains)
  cfg = pronet.ProNetConfig(level=args.level, hidden=128, num_blocks=4, cutoff=10.0,
                            dropout=0.3, receivers_sorted=bool(args.receivers_sorted),
                            dtype={"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype])
  steps = args.steps or (3 if args.quick else 10)
  repeats = args.repeats or (1 if args.quick else 3)
  results = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                        f"{os.cpu_count()} CPUs, jax {jax.__version__} "
                        f"{jax.devices()[0].platform}",
             "load_average_1min": os.getloadavg()[0],
             "config": {k: str(v) for k, v in vars(cfg).items()}, "batches": [], "budgets": []}

  for proteins in ([8] if args.quick else [8, 32]):
    examples = [chains[i % len(chains)] for i in range(proteins)]
    budget = layout.budget_for(examples, node_multiple=128, edge_multiple=1024)
    row = time_batch(cfg, layout.collate(examples, budget), steps, repeats)
    row["proteins"] = proteins
    row["vs_reference"] = row["residues_per_s"] / REFERENCE_RESIDUES_PER_S[proteins]
    results["batches"].append(row)
    print(f"{proteins:3d} proteins  {row['residues']:5d} residues  {row['real_edges']:6d} "
          f"edges  {row['step_ms']:8.1f} ms/step ({row['cpu_ms']:7.1f} CPU-ms)  "
          f"{row['residues_per_s']:8.0f} residues/s  "
          f"(compile {row['compile_s']:.1f} s)", flush=True)

  for n_node in ([512, 1024] if args.quick else [512, 1024, 2048, 4096, 8192]):
    examples = fill(chains, n_node)
    edges = sum(ex.num_edges for ex in examples)
    budget = layout.budget_for(examples, n_graph=len(examples) + 1)
    budget = type(budget)(n_node=n_node, n_edge=32 * n_node, n_graph=budget.n_graph,
                          n_row=budget.n_row, row_length=budget.row_length)
    assert edges <= budget.n_edge
    row = time_batch(cfg, layout.collate(examples, budget), steps, repeats)
    results["budgets"].append(row)
    print(f"budget {n_node:5d} nodes / {32 * n_node:6d} edges  {row['residues']:5d} "
          f"residues  {row['step_ms']:8.1f} ms/step ({row['cpu_ms']:7.1f} CPU-ms)  "
          f"{row['step_ms'] / n_node * 1e3:6.1f} "
          f"µs/node  {row['residues_per_s']:8.0f} residues/s", flush=True)

  common.write_json(args.json, results)


if __name__ == "__main__":
  main()
