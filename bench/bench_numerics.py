"""What float32 sums cost under bfloat16 compute, on CPU.

  python bench/bench_numerics.py [residual | pronet] [--quick] [--json PATH]
      [--preset t12_35M --batch 2 --length 256 --rounds 15]

residual: an ESM-2 layer stack (random weights, `model.esm.f32_residual` off and on)
in bfloat16: a training step's forward + backward (`jax.value_and_grad` of the mean
squared final state over all parameters), median seconds per step over steps that
alternate off / on (the ratio on / off is the median of per-pair ratios); with and
without per-layer remat, each compiled program's memory (`compiled.memory_analysis()`:
temporaries, and arguments + outputs + temporaries) and the bytes `jax.vjp` saves for
the backward pass. XLA's CPU backend computes bfloat16 elementwise work in float32, so
its temporaries need not show a dtype change that an accelerator would see; the saved
bytes come from shapes and dtypes alone.
pronet: the ProNet encoder (4 x 128 blocks, backbone level) in bfloat16 on synthetic
helices (4 proteins of 250 residues, nearest 32 neighbours within 10 Å): forward +
backward seconds per step (its message sums are float32), and one convolution's message
sum alone ([E, 128] bfloat16 messages, forward + backward) accumulated in bfloat16 and
in float32, alternating; the block runs 3 such sums.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import common  # noqa: E402  # pylint: disable=wrong-import-position

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position

MIB = 2 ** 20


def _memory(compiled) -> dict:
  m = compiled.memory_analysis()
  total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
  return {"temp_mib": m.temp_size_in_bytes / MIB, "total_mib": total / MIB}


def _saved_for_backward_mib(loss, params) -> float:
  """Bytes of what `jax.vjp(loss)` keeps for the backward pass (its residuals, the
  parameters it reads included), from shapes alone: what any backend must hold."""
  leaves = jax.eval_shape(lambda p: jax.tree_util.tree_leaves(jax.vjp(loss, p)[1]),
                          params)
  return sum(math.prod(x.shape) * x.dtype.itemsize for x in leaves) / MIB


def residual(preset: str, batch: int, length: int, rounds: int) -> list[dict]:
  """ESM-2 stack step time and compiled memory, f32_residual off / on (bfloat16)."""
  from bihier_jax.models import esm2  # pylint: disable=g-import-not-at-top
  tokens = jax.random.randint(jax.random.key(0), (batch, length), 4, 24)
  params = esm2.init_params(esm2.config_from_preset(preset, mlm_head=False))

  def loss_fn(cfg):
    def loss(p):
      out = esm2.ESM2(cfg).apply({"params": p}, tokens, output_hidden_states=False)
      return jnp.mean(jnp.square(out.last_hidden_state.astype(jnp.float32)))
    return loss

  rows, fns = [], {}
  for f32_residual in (False, True):
    for remat in (False, True):
      cfg = esm2.config_from_preset(preset, mlm_head=False, dtype=jnp.bfloat16,
                                    f32_residual=f32_residual, remat=remat)
      fn = jax.jit(jax.value_and_grad(loss_fn(cfg)))
      rows.append({"preset": preset, "batch": batch, "length": length,
                   "f32_residual": f32_residual, "remat": remat,
                   **_memory(fn.lower(params).compile()),
                   "saved_for_backward_mib": _saved_for_backward_mib(loss_fn(cfg),
                                                                     params)})
      if not remat:
        jax.block_until_ready(fn(params))  # compile + warm up
        fns[f32_residual] = fn
  # Steps alternate off / on, so load on the shared machine hits both alike; the ratio
  # is the median of the per-pair ratios.
  seconds = common.alternating_rounds(
      {f32_residual: lambda fn=fn: jax.block_until_ready(fn(params))
       for f32_residual, fn in fns.items()}, rounds)
  for row in rows:
    if not row["remat"]:
      row["seconds"] = seconds[row["f32_residual"]]
      row["median_seconds"] = statistics.median(row["seconds"])
      if row["f32_residual"]:
        row["time_ratio_vs_off"] = common.median_ratio(seconds, True, False)
  return rows


def pronet_step(rounds: int, steps: int) -> dict:
  """ProNet 4 x 128 forward + backward seconds per step in bfloat16, and the message sum
  alone (forward + backward, the shapes of one convolution of that batch) summed in
  bfloat16 and in float32, alternating."""
  from bihier_jax.data import layout  # pylint: disable=g-import-not-at-top
  from bihier_jax import testing  # pylint: disable=g-import-not-at-top
  from bihier_jax.models import pronet  # pylint: disable=g-import-not-at-top
  examples = [testing.random_example(250, seed=s, n_chains=2) for s in range(4)]
  batch = layout.collate(examples, layout.budget_for(examples))
  config = pronet.ProNetConfig(dtype=jnp.bfloat16, dropout=0.0)
  model = pronet.ProNet(config)
  params = jax.jit(model.init)(jax.random.key(0), batch.graph)

  def loss(p):
    nodes = model.apply(p, batch.graph).nodes.astype(jnp.float32)
    return jnp.mean(jnp.square(nodes))

  step = jax.jit(jax.value_and_grad(loss))
  jax.block_until_ready(step(params))
  step_seconds = [common.timed(lambda: jax.block_until_ready(step(params)), steps, warmup=0) for _ in range(rounds)]

  receivers = jnp.asarray(batch.graph.receivers)
  num_nodes = batch.node_mask.shape[0]
  messages = jax.random.normal(jax.random.key(1), (receivers.shape[0], config.hidden),
                               jnp.bfloat16)

  def message_sum(accumulate):
    def total(m):
      summed = jax.ops.segment_sum(m.astype(accumulate), receivers, num_nodes)
      return jnp.sum(jnp.square(summed.astype(jnp.bfloat16).astype(jnp.float32)))
    return jax.jit(jax.grad(total))

  sums = {"bfloat16": message_sum(jnp.bfloat16), "float32": message_sum(jnp.float32)}
  seconds = {name: [] for name in sums}
  for fn in sums.values():
    jax.block_until_ready(fn(messages))
  for _ in range(rounds):
    for name, fn in sums.items():
      seconds[name].append(common.timed(lambda fn=fn: jax.block_until_ready(fn(messages)),
                                        steps, warmup=0))
  return {"nodes": int(batch.node_mask.sum()), "edges": int(batch.edge_mask.sum()),
          "step_seconds": statistics.median(step_seconds),
          **{f"message_sum_{name}_ms": 1e3 * statistics.median(s)
             for name, s in seconds.items()}}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("what", nargs="?", default="all",
                      choices=("all", "residual", "pronet"))
  parser.add_argument("--preset", default="t12_35M")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--length", type=int, default=256)
  parser.add_argument("--rounds", type=int, default=15)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--quick", action="store_true",
                      help="t6_8M, 2 x 128 tokens, 3 rounds: a smoke run")
  parser.add_argument("--json", default="")
  args = parser.parse_args(argv)
  if args.quick:
    args.preset, args.length, args.rounds = "t6_8M", 128, 3
  result = {}
  if args.what in ("all", "residual"):
    result["residual"] = residual(args.preset, args.batch, args.length, args.rounds)
  if args.what in ("all", "pronet"):
    result["pronet"] = pronet_step(min(args.rounds, 5), args.steps)
  text = json.dumps(result, indent=1)
  print(text)
  if args.json:
    with open(args.json, "w") as f:
      f.write(text + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
