"""Packed ESM rows benchmark: how much of the ESM work is real, by row layout and model.

  python bench/bench_packing.py [--quick] [--json PATH] [--examples N] [--whole-step t33_650M]

On PDB-like single chains (lognormal lengths, median 200 residues, log-sd 0.7, clipped
to 30..1500 and cropped to 1,022, the distribution of bench_input_pipeline.py; edges 12
per node), for batch sizes 8 and 32, the pipeline's own packing rule
(`bihier_jax.data.packing.simulate`, one random-order pass in chunks as `make_dataset`
packs them) gives, per layout:

- token efficiency: real ESM tokens (incl. <cls>/<eos>) / token slots of all rows;
- attention efficiency: real same-chain (query, key) pairs / computed score entries,
  Σ over rows of Σ over its chains of n² / L² (dense attention over the row, which is
  what the backends compute);
- proteins per batch, distinct budgets (compiled shapes);
- ESM matmul FLOPs per real token of one layer (`flops.esm_matmul_flops` per slot),
  per ESM-2 preset, and packed / unpacked: the expected ratio of ESM step time.

--whole-step PRESET (batch 8): also the matmul FLOPs per real residue of a whole fused
training step (forward + backward of `steps.loss_and_grads`, every module), counted from
its jaxpr with abstract parameters per budget and weighted by the simulated pass, for
both layouts.

Layouts: today's one chain per row in the length buckets (128, 256, 512, 1024), and
packed rows with the row length `choose_row_length` picks for each preset (the table
of every candidate is in the JSON). Pure numpy: no model runs, so the figures do not
depend on the machine; only the run time of the choice does.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import common  # noqa: E402  # pylint: disable=wrong-import-position

common.setup(jax_platforms="cpu")

import numpy as np  # noqa: E402

from bihier_jax import testing  # noqa: E402
from bihier_jax.common import flops  # noqa: E402
from bihier_jax.data import batch_plan  # noqa: E402
from bihier_jax.data import budgets as budgets_lib  # noqa: E402
from bihier_jax.data import layout  # noqa: E402
from bihier_jax.data import packing  # noqa: E402
from bihier_jax.models import esm2  # noqa: E402
from configs import default  # noqa: E402

PRESETS = ("t6_8M", "t12_35M", "t33_650M", "t36_3B")


def realistic_sizes(n: int, seed: int = 0) -> np.ndarray:
  """int[n, 4] (nodes, longest chain, chains, edges) of PDB-like single chains."""
  lengths = testing.pdb_like_lengths(n, seed)
  return np.stack([lengths, lengths, np.ones_like(lengths), 12 * lengths], 1)


def layout_figures(sizes, budgets, *, max_residues: int, chunk_size: int) -> dict:
  """Efficiencies and ESM FLOPs per real token of one simulated pass."""
  sim = packing.simulate(sizes, budgets, max_residues=max_residues, chunk_size=chunk_size)
  shape = np.array([[b.n_row, b.row_length] for b in budgets], np.int64)[sim.budget]
  slots = shape[:, 0] * shape[:, 1]
  out = {
      "token_efficiency": float(sim.tokens.sum() / slots.sum()),
      "attention_efficiency": float(sim.pairs.sum() / (slots * shape[:, 1]).sum()),
      "proteins_per_batch": float(sim.proteins.mean()),
      "batches": int(len(sim)),
      "distinct_budgets": len(set(budgets)),
      "budgets": [[b.n_node, b.n_edge, b.n_graph, b.n_row, b.row_length,
                   b.graph_capacity] for b in budgets],
      "gflop_per_real_token_per_layer": {},
  }
  for preset in PRESETS:
    cfg = esm2.config_from_preset(preset)
    layer = np.array([flops.esm_matmul_flops(b.row_length, cfg.embed_dim, cfg.ffn_dim)
                      for b in budgets], np.float64)[sim.budget]
    out["gflop_per_real_token_per_layer"][preset] = float(
        (slots * layer).sum() / sim.tokens.sum() / 1e9)
  return out


def whole_step_flops(config, budgets, sizes, *, chunk_size: int) -> dict:
  """Matmul FLOPs per real residue of a whole fused training step (forward + backward
  of `steps.loss_and_grads`, every module: ESM-2, ProNet, fusion, head), counted from
  the jaxpr with abstract parameters, once per budget, weighted by how often the
  simulated pass uses each budget."""
  import jax  # pylint: disable=import-outside-toplevel
  from bihier_jax.common import flops  # pylint: disable=import-outside-toplevel
  from bihier_jax import testing  # pylint: disable=import-outside-toplevel
  from bihier_jax import models  # pylint: disable=import-outside-toplevel
  from bihier_jax.training import steps, train_state  # pylint: disable=import-outside-toplevel
  sim = packing.simulate(sizes, budgets, max_residues=int(config.data.max_residues),
                         chunk_size=chunk_size)
  model = models.build_model(config)
  per_budget = []
  for budget in budgets:
    batch = layout.collate([testing.random_example(20, seed=0)], budget)
    params = jax.eval_shape(lambda k, b: model.init(k, b)["params"], jax.random.key(0),
                            batch)
    stacked = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(
        (1,) + x.shape, x.dtype), batch)
    rng = jax.ShapeDtypeStruct((2,), jax.numpy.uint32)
    per_budget.append(flops.matmul_flops(
        lambda p, b, r: steps.loss_and_grads(p, b, r, 0, model=model, task=config.task),
        params, stacked, rng))
  total = float(np.array(per_budget, np.float64)[sim.budget].sum())
  return {"tflop_per_budget": [f / 1e12 for f in per_budget],
          "mflop_per_real_residue": total / float(sim.nodes.sum()) / 1e6}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--json", default="")
  parser.add_argument("--whole-step", default="", metavar="PRESET",
                      help="also count a whole fused training step's matmul FLOPs per "
                           "real residue from its jaxpr (batch 8), e.g. t33_650M")
  parser.add_argument("--examples", type=int, default=0,
                      help="sizes simulated (default 29,215, react's training split)")
  args = parser.parse_args()
  n = args.examples or (4000 if args.quick else 29_215)
  sizes = realistic_sizes(n)
  results = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}"
                        f", {os.cpu_count()} cpus", "examples": n, "batch_sizes": {}}
  for batch_size in (8, 32):
    config = default.get_config()
    config.train.batch_size = batch_size
    chunk = batch_plan.default_chunk_size(batch_size)
    max_res = int(config.data.max_residues)
    config.data.pack_rows = False
    unpacked = layout_figures(sizes, budgets_lib.bucket_budgets(config, sizes),
                              max_residues=max_res, chunk_size=chunk)
    row = {"unpacked": unpacked, "packed": {}}
    config.data.pack_rows = True
    for preset in PRESETS:
      esm = esm2.config_from_preset(preset)
      t = time.perf_counter()
      costs = budgets_lib.row_length_costs(
          sizes, esm.embed_dim, esm.ffn_dim, batch_size=batch_size, max_residues=max_res,
          length_buckets=config.data.length_buckets,
          max_neighbors=int(config.data.max_neighbors))
      chosen = min(costs, key=lambda k: (costs[k]["flops_per_real_token"], k))
      choose_s = time.perf_counter() - t
      config.model.esm.preset = preset
      budgets = budgets_lib.bucket_budgets(config, sizes)
      assert budgets[0].row_length == chosen
      figures = layout_figures(sizes, budgets, max_residues=max_res, chunk_size=chunk)
      figures.update(
          row_length=chosen, choose_s=round(choose_s, 2),
          esm_flops_packed_over_unpacked=(
              figures["gflop_per_real_token_per_layer"][preset]
              / unpacked["gflop_per_real_token_per_layer"][preset]),
          candidates={str(k): {"gflop_per_real_token_per_layer":
                               v["flops_per_real_token"] / 1e9,
                               "token_efficiency": v["token_efficiency"],
                               "attention_efficiency": v["attention_efficiency"],
                               "proteins_per_batch": v["proteins_per_batch"]}
                      for k, v in costs.items()})
      row["packed"][preset] = figures
    if args.whole_step and batch_size == 8:
      config.model.esm.preset = args.whole_step
      whole = {}
      for pack in (False, True):
        config.data.pack_rows = pack
        whole["packed" if pack else "unpacked"] = whole_step_flops(
            config, budgets_lib.bucket_budgets(config, sizes), sizes,
            chunk_size=chunk)
      whole["unpacked_over_packed"] = (whole["unpacked"]["mflop_per_real_residue"]
                                       / whole["packed"]["mflop_per_real_residue"])
      row["whole_step_" + args.whole_step] = whole
      print(f"  whole fused step, {args.whole_step}: MFLOP per real residue unpacked "
            f"{whole['unpacked']['mflop_per_real_residue']:.1f}, packed "
            f"{whole['packed']['mflop_per_real_residue']:.1f} "
            f"({whole['unpacked_over_packed']:.3f}x fewer packed)")
    results["batch_sizes"][str(batch_size)] = row
    print(f"batch {batch_size}: unpacked tokens {unpacked['token_efficiency']:.3f} "
          f"attention {unpacked['attention_efficiency']:.3f} proteins/batch "
          f"{unpacked['proteins_per_batch']:.2f} budgets {unpacked['distinct_budgets']}")
    for preset, f in row["packed"].items():
      print(f"  {preset:9s} L={f['row_length']:4d} tokens {f['token_efficiency']:.3f} "
            f"attention {f['attention_efficiency']:.3f} proteins/batch "
            f"{f['proteins_per_batch']:.2f} budgets {f['distinct_budgets']} ESM FLOPs "
            f"packed/unpacked {f['esm_flops_packed_over_unpacked']:.3f} "
            f"(choice {f['choose_s']} s)")
  common.write_json(args.json, results)


if __name__ == "__main__":
  main()
