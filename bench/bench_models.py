"""Step time (forward + backward) and parameter count of every model kind.

  python bench/bench_models.py [--quick] [--json PATH] [--sizes tiny,t6] [--repeats 3]
                               [--flop-sizes t12,t33]

Two sizes, random weights, synthetic helical proteins (`bihier_jax.testing`):
  tiny  ESM-2 preset 'tiny' (4 x 64) + GNN 2 x 32, fusion width 32; 8 proteins x 64 res.
  t6    ESM-2 t6_8M-shaped (6 x 320, 20 heads) + GNN 4 x 128 (backbone level), fusion
        width 128, 4 heads, levels (2, 4), even pairing; 8 proteins x 256 residues.
Kinds: esm_only, gnn_only, serial, parallel, cross, and bihier in both fusion modes
(direction bi). One step = jitted value_and_grad of the training loss (node-level
3-class softmax CE), dropout on; median wall time of `--repeats` steps after one warm-up
(compile) step; steps of all kinds alternate in rounds. Goal (issue 5): bihier costs
≤ 15% more per step than `parallel`.
Each kind also reports the matmul FLOPs of its step (`bihier_jax.common.flops`, forward +
backward, exact from the jaxpr) and their ratio to `parallel`: the step-time ratio a kind
would have if its extra matmuls ran exactly as efficiently as the encoders' own.
`--flop-sizes` counts (does not time) the same for the t6 setting with ESM-2 t12_35M and
t33_650M trunks, on abstract parameters. Step ratios are given two ways: ratio of the
median step times, and median over rounds of the ratio within a round (less sensitive to
load drifting between rounds).

Prints one JSON object; `--json PATH` also writes it. `--quick`: tiny size only, 2 steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import common  # noqa: E402  # pylint: disable=wrong-import-position

common.setup(jax_platforms="cpu")

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np

from bihier_jax import models
from bihier_jax.common import flops
from bihier_jax.data import layout
from bihier_jax import testing
from bihier_jax.models import heads
from configs import default

KINDS = (("esm_only", None), ("gnn_only", None), ("serial", None), ("parallel", None),
         ("cross", None), ("bihier", "global"), ("bihier", "local"))

SIZES = {
    "tiny": dict(esm="tiny", gnn_hidden=32, gnn_blocks=2, fusion_dim=32, levels=(1, 2),
                 proteins=8, residues=64),
    "t6": dict(esm="t6_8M", gnn_hidden=128, gnn_blocks=4, fusion_dim=128, levels=(2, 4),
               proteins=8, residues=256),
}
# Counted, not timed: the t6 setting with the larger ESM-2 trunks users fine-tune.
FLOP_SIZES = {name: dict(SIZES["t6"], esm=preset)
              for name, preset in (("t12", "t12_35M"), ("t33", "t33_650M"))}


def kind_label(kind: str, mode: str | None) -> str:
  return kind if mode is None else f"{kind}_{mode}"


def size_json(size: dict) -> dict:
  return {k: list(v) if isinstance(v, tuple) else v for k, v in size.items()}


def make_config(size: dict, kind: str, mode: str | None, dtype: str = "float32"):
  c = default.get_config()
  c.model.kind = kind
  c.model.dtype = dtype
  c.model.esm.preset = size["esm"]
  c.model.gnn.hidden = size["gnn_hidden"]
  c.model.gnn.num_blocks = size["gnn_blocks"]
  c.model.fusion.dim = size["fusion_dim"]
  c.model.fusion.levels = size["levels"]
  c.model.fusion.mode = mode or "global"
  return c


def make_batch(size: dict):
  examples = [testing.random_example(size["residues"], seed=i)
              for i in range(size["proteins"])]
  budget = layout.budget_for(examples, node_multiple=64, edge_multiple=256)
  return jax.tree_util.tree_map(jnp.asarray, layout.collate(examples, budget))


def train_step_fn(config, batch):
  """(model, value_and_grad of the training loss): (params, rng) -> (loss, grads)."""
  model = models.build_model(config)

  def loss_fn(params, rng):
    out = model.apply({"params": params}, batch, deterministic=False,
                      rngs={"dropout": rng})
    return heads.loss(config.task, out.logits, batch)[0]

  return model, jax.value_and_grad(loss_fn)


def step_matmul_gflop(config, batch) -> float:
  """Matmul GFLOP of one training step, traced on abstract parameters (none allocated,
  so ESM-2 t33_650M costs no memory)."""
  model, grad_fn = train_step_fn(config, batch)
  shapes = jax.eval_shape(lambda r: model.init(r, batch, deterministic=True)["params"],
                          jax.random.PRNGKey(0))
  return flops.matmul_flops(grad_fn, shapes, jax.random.PRNGKey(1)) / 1e9


def prepare(config, batch):
  """(compiled step, params, row: parameter counts, matmul GFLOP, first-step seconds
  incl. compile)."""
  model, grad_fn = train_step_fn(config, batch)
  params = models.init_params(model, batch, jax.random.PRNGKey(0))
  num_params = int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))
  per_module = {k: int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(v)))
                for k, v in params.items()}
  step = jax.jit(grad_fn)
  matmul_flops = flops.matmul_flops(step, params, jax.random.PRNGKey(1))
  t0 = time.perf_counter()
  loss, _ = jax.block_until_ready(step(params, jax.random.PRNGKey(1)))
  if not np.isfinite(float(loss)):
    raise RuntimeError(f"non-finite loss for model.kind={config.model.kind}")
  return step, params, {"params": num_params, "params_per_module": per_module,
                        "matmul_gflop": matmul_flops / 1e9,
                        "first_step_s": time.perf_counter() - t0}


def time_step(step, params, seed: int) -> float:
  t0 = time.perf_counter()
  jax.block_until_ready(step(params, jax.random.PRNGKey(seed)))
  return time.perf_counter() - t0


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--json", default="")
  parser.add_argument("--sizes", default="tiny,t6")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--flop-sizes", default=",".join(FLOP_SIZES))
  args = parser.parse_args()
  sizes = ["tiny"] if args.quick else args.sizes.split(",")
  repeats = 2 if args.quick else args.repeats

  result = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                        "cpu_count": os.cpu_count(),
                        "devices": [str(d) for d in jax.devices()]},
            "dtype": args.dtype, "repeats": repeats, "sizes": {}}
  for name in sizes:
    size = SIZES[name]
    batch = make_batch(size)
    rows, steps = {}, {}
    for kind, mode in KINDS:
      label = kind_label(kind, mode)
      step, params, rows[label] = prepare(make_config(size, kind, mode, args.dtype), batch)
      steps[label] = (step, params)
      print(f"{name:5s} {label:15s} params {rows[label]['params']:>10,d}  "
            f"(first step {rows[label]['first_step_s']:.1f} s)", flush=True)
    # Rounds over all kinds, so drifting load on a shared machine hits every kind alike.
    times = {label: [] for label in rows}
    for r in range(repeats):
      for label, (step, params) in steps.items():
        times[label].append(time_step(step, params, seed=2 + r))
    for label, row in rows.items():
      row["step_s"] = float(np.median(times[label]))
      row["step_s_all"] = times[label]
    parallel = rows["parallel"]
    for label, row in rows.items():
      row["step_vs_parallel"] = row["step_s"] / parallel["step_s"]
      row["step_vs_parallel_within_rounds"] = float(np.median(
          np.asarray(times[label]) / np.asarray(times["parallel"])))
      row["matmul_flops_vs_parallel"] = row["matmul_gflop"] / parallel["matmul_gflop"]
      print(f"{name:5s} {label:15s} step {row['step_s'] * 1e3:9.1f} ms  "
            f"x{row['step_vs_parallel']:.2f} of parallel "
            f"(x{row['step_vs_parallel_within_rounds']:.2f} within rounds); matmul "
            f"{row['matmul_gflop']:7.2f} GFLOP x{row['matmul_flops_vs_parallel']:.3f}",
            flush=True)
    result["sizes"][name] = {"config": size_json(size), "budget": str(batch.budget),
                             "kinds": rows}
  flop_sizes = [] if args.quick else [n for n in args.flop_sizes.split(",") if n]
  result["matmul_gflop_only"] = {}
  for name in flop_sizes:
    size = FLOP_SIZES[name]
    batch = make_batch(size)
    counts = {}
    for kind, mode in KINDS:
      label = kind_label(kind, mode)
      counts[label] = step_matmul_gflop(make_config(size, kind, mode, args.dtype), batch)
    result["matmul_gflop_only"][name] = {
        "config": size_json(size),
        "kinds": {label: {"matmul_gflop": g, "matmul_flops_vs_parallel":
                          g / counts["parallel"]} for label, g in counts.items()}}
    for label, g in counts.items():
      print(f"{name:5s} {label:15s} matmul {g:8.1f} GFLOP x{g / counts['parallel']:.3f} "
            f"of parallel (counted, not timed)", flush=True)
  text = json.dumps(result, indent=1)
  print(text)
  if args.json:
    with open(args.json, "w") as f:
      f.write(text)


if __name__ == "__main__":
  main()
