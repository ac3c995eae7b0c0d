"""Full bihier model: step time vs length, XLA compilations per epoch, input vs step time.

  python bench/bench_full_model.py [--quick] [--json PATH]
  python bench/bench_full_model.py --gpu --json gpu.json     # on a GPU machine

What is measured (one device, one training step = forward + backward + AdamW update of
the whole model, the same loss the trainer uses):

- compilations: two "epochs" of synthetic helical proteins of mixed lengths, packed into
  the task's padding budgets (`budgets.bucket_budgets`: one per length bucket
  128 ... 1024), counting XLA backend compilations with a `jax.monitoring` listener on
  '/jax/core/compile/backend_compile_duration'. The step must compile at most once per
  budget in epoch 1 and never in epoch 2.
- step_time_vs_length: per budget (ESM rows of L tokens), proteins of L - 2 residues
  packed into it; median wall time of a step (the program is compiled already).
- input_vs_step: host time to pad a batch (`layout.collate`) and copy it to the
  device, against the device step time of the same batch.
- --gpu: ESM-2 t33_650M + 4 x 128 GNN, bfloat16 compute, L = 512: step time, model-FLOPs
  utilisation (analytic ESM-trunk training FLOPs over the chip's dense bf16 peak; the
  GNN, fusion and heads are not counted, so this slightly understates the MFU),
  and peak device memory (`memory_stats()['peak_bytes_in_use']`) with and without
  per-layer ESM rematerialisation. Each remat setting runs in its own process, because
  the peak counter never resets.

Prints one JSON object; `--json PATH` also writes it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import traceback

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

from bench import common  # pylint: disable=wrong-import-position

common.setup()

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from bihier_jax import testing  # pylint: disable=wrong-import-position
from bihier_jax.common import flops as flops_lib  # pylint: disable=wrong-import-position
from bihier_jax.common import residue_constants as rc  # pylint: disable=wrong-import-position

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
STEP_NAME = "bench_train_step"


class CompileCounter:
  """Counts XLA backend compilations by function name while installed."""

  def __init__(self):
    self.names: list[str] = []

  def __call__(self, event: str, duration: float, **kwargs) -> None:
    del duration
    if event == COMPILE_EVENT:
      self.names.append(str(kwargs.get("fun_name", "?")))

  def __enter__(self):
    jax.monitoring.register_event_duration_secs_listener(self)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self)

  def count(self, substring: str = "") -> int:
    return sum(substring in n for n in self.names)


def bench_config(preset: str, dtype: str = "float32", remat: bool = False,
                 batch_size: int = 2):
  """configs/default.py with the full bihier model at one ESM size."""
  from configs import default  # pylint: disable=import-outside-toplevel
  config = default.get_config()
  config.model.kind = "bihier"
  config.model.esm.preset = preset
  config.model.esm.checkpoint = ""
  config.model.esm.remat = remat
  config.model.dtype = dtype
  config.model.gnn.num_blocks = 4
  config.model.gnn.hidden = 128
  config.train.batch_size = batch_size
  return config


class Stepper:
  """Model, optimizer and one jitted training step (single device)."""

  def __init__(self, config, example_batch, seed: int = 0):
    from bihier_jax import models  # pylint: disable=import-outside-toplevel
    from bihier_jax.models import heads  # pylint: disable=import-outside-toplevel
    from bihier_jax.training import optim  # pylint: disable=import-outside-toplevel

    self.config = config
    self.model = models.build_model(config)
    self.params = models.init_params(self.model, example_batch, jax.random.key(seed))
    self.tx = optim.make_optimizer(config)
    model, task, tx = self.model, config.task, self.tx
    trainable = model.config.trainable  # the optimizer sees trainable views only
    self.opt_state = jax.jit(lambda p: tx.init(trainable.select(p)))(self.params)

    def loss_fn(params, batch, rng):
      out = model.apply({"params": params}, batch, deterministic=False,
                        rngs={"dropout": rng})
      return heads.loss(task, out.logits, batch)[0]

    def bench_train_step(params, opt_state, batch, rng):
      loss, grads = jax.value_and_grad(loss_fn)(params, batch, rng)
      updates, opt_state = tx.update(trainable.select(grads), opt_state,
                                     trainable.select(params))
      return trainable.apply_updates(params, updates), opt_state, loss

    self.step_fn = jax.jit(bench_train_step, donate_argnums=(0, 1))
    self.rng = jax.random.key(seed + 1)

  def step(self, batch) -> float:
    """One step; returns wall seconds (device work included)."""
    self.rng, key = jax.random.split(self.rng)
    start = time.perf_counter()
    self.params, self.opt_state, loss = self.step_fn(self.params, self.opt_state, batch,
                                                     key)
    loss.block_until_ready()
    elapsed = time.perf_counter() - start
    if not np.isfinite(float(loss)):
      raise FloatingPointError(f"non-finite loss {float(loss)}")
    return elapsed

  def compiled(self, batch):
    return self.step_fn.lower(self.params, self.opt_state, batch, self.rng).compile()


def make_examples(lengths, seed: int = 0, num_classes: int = 3):
  return [testing.random_example(int(n), seed=seed + i, num_classes=num_classes)
          for i, n in enumerate(lengths)]


def pack(examples, budgets):
  """Examples -> [(budget index, [examples])]: each goes to the smallest budget it fits,
  then batches are packed greedily in order, as the pipeline's budget rule does."""
  from bihier_jax.data import layout  # pylint: disable=import-outside-toplevel
  from bihier_jax.data import packing  # pylint: disable=import-outside-toplevel
  by_budget: dict[int, list] = {}
  for ex in examples:
    i = next((i for i, b in enumerate(budgets)
              if packing.fits(*layout.plan_inputs([ex]), b) is None), None)
    if i is None:
      raise ValueError(f"{ex.id} ({ex.num_residues} residues) fits no budget")
    by_budget.setdefault(i, []).append(ex)
  batches = []
  for i, members in sorted(by_budget.items()):
    current = []
    for ex in members:
      if (current and packing.fits(*layout.plan_inputs(current + [ex]), budgets[i])
          is not None):
        batches.append((i, current))
        current = []
      current.append(ex)
    if current:
      batches.append((i, current))
  return batches


def to_device(batch):
  return jax.block_until_ready(jax.device_put(batch))


def full_model_suite(preset: str, max_length: int, batch_size: int, num_examples: int,
                     steps: int, seed: int = 0) -> dict:
  """All CPU/GPU figures on one model, sharing its compiled programs (one per budget).

  1. compilations: two epochs over mixed-length proteins packed into the task's padding
     budgets (`budgets.bucket_budgets`, one per length bucket).
  2. step_time_vs_length: per budget, a batch of proteins of L - 2 residues packed into
     it, median step time (already compiled).
  3. input_vs_step: host padding + copy vs device step at the middle budget.
  """
  from bihier_jax.data import budgets as budgets_lib  # pylint: disable=import-outside-toplevel
  from bihier_jax.data import layout  # pylint: disable=import-outside-toplevel
  from bihier_jax.data import packing  # pylint: disable=import-outside-toplevel
  config = bench_config(preset, batch_size=batch_size)
  config.data.length_buckets = tuple(
      b for b in (128, 256, 512, 1024) if b <= max_length)
  config.data.max_residues = max_length - 2
  rng = np.random.default_rng(seed)
  examples = make_examples(rng.integers(20, max_length - 1, size=num_examples), seed)
  budgets = budgets_lib.bucket_budgets(config, layout.size_rows(examples))
  batches = pack(examples, budgets)
  batches = [batches[i] for i in rng.permutation(len(batches))]
  host = [(i, layout.collate(members, budgets[i])) for i, members in batches]

  with CompileCounter() as setup:
    stepper = Stepper(config, to_device(host[0][1]))
  epochs, compile_s = [], {}
  for _ in range(2):
    with CompileCounter() as counter:
      for i, batch in host:
        before = len(counter.names)
        elapsed = stepper.step(to_device(batch))
        if counter.count(STEP_NAME) and len(counter.names) > before:
          compile_s.setdefault(i, elapsed)
    epochs.append(counter)
  used = sorted({i for i, _ in host})
  compilations = {
      "length_buckets": list(config.data.length_buckets),
      "padding_budgets": len(budgets),
      "padding_budgets_used": len(used),
      "batches_per_epoch": len(host),
      "setup_compiles": setup.count(),
      "epoch1_step_compiles": epochs[0].count(STEP_NAME),
      "epoch1_all_compiles": epochs[0].count(),
      "epoch2_step_compiles": epochs[1].count(STEP_NAME),
      "epoch2_all_compiles": epochs[1].count(),
      "within_bound": (epochs[0].count(STEP_NAME) <= len(used)
                       and epochs[1].count(STEP_NAME) == 0),
  }
  print(f"  compilations: {compilations}", file=sys.stderr, flush=True)

  rows = []
  with CompileCounter() as extra:
    for i, budget in enumerate(budgets):
      length = budget.row_length
      full = []
      for j, ex in enumerate(make_examples([length - 2] * batch_size, seed=1000 + length)):
        if packing.fits(*layout.plan_inputs(full + [ex]), budget) is None:
          full.append(ex)
      batch = to_device(layout.collate(full, budget))
      stepper.step(batch)  # compiled already if the epoch used this budget
      times = [stepper.step(batch) for _ in range(steps)]
      med = statistics.median(times)
      residues = sum(ex.num_residues for ex in full)
      rows.append({"length": length, "proteins": len(full), "residues": residues,
                   "budget_nodes": budget.n_node, "budget_edges": budget.n_edge,
                   "step_ms": round(1e3 * med, 2),
                   "step_ms_min": round(1e3 * min(times), 2),
                   "first_step_s": (round(compile_s[i], 2) if i in compile_s else None),
                   "residues_per_s": round(residues / med, 1)})
      print(f"  L={length}: {1e3 * med:.1f} ms/step", file=sys.stderr, flush=True)
  compilations["extra_step_compiles_for_unused_budgets"] = extra.count(STEP_NAME)

  middle = budgets[len(budgets) // 2]
  members = next(m for i, m in batches if budgets[i] == middle) if any(
      budgets[i] == middle for i, _ in batches) else make_examples([20], seed=5)
  collate_s, put_s, step_s = [], [], []
  for _ in range(steps):
    t0 = time.perf_counter()
    batch = layout.collate(members, middle)
    t1 = time.perf_counter()
    dev = to_device(batch)
    t2 = time.perf_counter()
    step_s.append(stepper.step(dev))
    collate_s.append(t1 - t0)
    put_s.append(t2 - t1)
  host_ms = 1e3 * (statistics.median(collate_s) + statistics.median(put_s))
  step_ms = 1e3 * statistics.median(step_s)
  input_vs_step = {
      "length": middle.row_length, "proteins": len(members),
      "host_collate_ms": round(1e3 * statistics.median(collate_s), 2),
      "host_to_device_ms": round(1e3 * statistics.median(put_s), 2),
      "device_step_ms": round(step_ms, 2),
      "input_fraction_if_serial": round(host_ms / (host_ms + step_ms), 4)}
  return {"compilations": compilations, "step_time_vs_length": rows,
          "input_vs_step": input_vs_step}


def esm_train_flops(preset: str, num_rows: int, length: int) -> float:
  """Analytic training FLOPs of the ESM-2 trunk: 3 x forward, forward = tokens x layers x
  `flops.esm_matmul_flops` (matmul params and attention scores and values)."""
  from bihier_jax.models import esm2  # pylint: disable=import-outside-toplevel
  cfg = esm2.config_from_preset(preset)
  per_token = flops_lib.esm_matmul_flops(length, cfg.embed_dim, cfg.ffn_dim)
  return 3.0 * num_rows * length * cfg.num_layers * per_token


def gpu_child(remat: bool, preset: str, length: int, batch_size: int, steps: int):
  """One remat setting in this process: step time, FLOPs, memory."""
  from bihier_jax.data import layout  # pylint: disable=import-outside-toplevel
  device = jax.devices()[0]
  config = bench_config(preset, "bfloat16", remat, batch_size)
  examples = make_examples([length - 2] * batch_size, seed=3)
  budget = layout.budget_for(examples, node_multiple=128, edge_multiple=128)
  batch = to_device(layout.collate(examples, budget))
  stepper = Stepper(config, batch)
  start = time.perf_counter()
  compiled = stepper.compiled(batch)
  compile_s = time.perf_counter() - start
  xla_flops = None
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_flops = float(cost.get("flops")) if cost and cost.get("flops") else None
  except Exception:  # pylint: disable=broad-except
    pass
  program_bytes = None
  try:
    mem = compiled.memory_analysis()
    program_bytes = int(mem.temp_size_in_bytes + mem.argument_size_in_bytes
                        + mem.output_size_in_bytes - mem.alias_size_in_bytes)
  except Exception:  # pylint: disable=broad-except
    pass
  first = stepper.step(batch)
  times = [stepper.step(batch) for _ in range(steps)]
  step_s = statistics.median(times)
  stats = device.memory_stats() or {}
  peak = flops_lib.peak_bf16_flops(device)
  model_flops = esm_train_flops(preset, batch_size, length)
  return {
      "remat": remat, "device": getattr(device, "device_kind", str(device)),
      "preset": preset, "gnn": "4x128", "dtype": "bfloat16", "length": length,
      "batch_size": batch_size, "compile_s": round(compile_s, 1),
      "first_step_s": round(first, 2),
      "step_ms": round(1e3 * step_s, 2), "step_ms_min": round(1e3 * min(times), 2),
      "esm_model_tflop_per_step": round(model_flops / 1e12, 3),
      # XLA's cost analysis leaves out library calls (cuBLAS/cuDNN GEMMs on GPU), so
      # it undercounts there; the MFU uses the analytic model FLOPs only.
      "xla_cost_analysis_tflop": None if xla_flops is None else round(
          xla_flops / 1e12, 3),
      "peak_tflops": None if peak is None else peak / 1e12,
      "mfu_esm_model_flops": None if peak is None else round(
          model_flops / step_s / peak, 4),
      "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
      "peak_gib": None if "peak_bytes_in_use" not in stats else round(
          stats["peak_bytes_in_use"] / 2**30, 2),
      "compiled_program_gib": None if program_bytes is None else round(
          program_bytes / 2**30, 2),
  }


def gpu_suite(preset: str, length: int, batch_size: int, steps: int, timeout: int):
  """Runs gpu_child for remat off/on in fresh processes; failures are recorded."""
  results = {}
  for remat in (False, True):
    cmd = [sys.executable, os.path.abspath(__file__), "--gpu-child",
           "--remat" if remat else "--no-remat", "--preset", preset,
           "--gpu-length", str(length), "--gpu-batch-size", str(batch_size),
           "--steps", str(steps)]
    key = "remat" if remat else "no_remat"
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                            check=False)
      lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
      if proc.returncode == 0 and lines:
        results[key] = json.loads(lines[-1])
      else:
        results[key] = {"error": f"exit {proc.returncode}",
                        "stderr_tail": proc.stderr[-2000:]}
    except subprocess.TimeoutExpired:
      results[key] = {"error": f"timeout after {timeout} s"}
    print(f"  gpu {key}: {json.dumps(results[key])[:300]}", file=sys.stderr, flush=True)
  return results


def varlen_step_speed(preset: str, n: int, batch_size: int, rounds: int,
                      row_lengths=(0,)) -> dict:
  """Fused training steps over `n` proteins of realistic lengths, packed ESM rows
  (data.pack_rows) against one chain per row in length buckets, side by side.
  row_lengths: the packed layouts' data.row_length (0: the one the pipeline chooses);
  each is one more layout in the same alternating passes ("packed" for the first,
  "packed_<L>" for the others).

  Both layouts batch the same proteins as evaluation would (`inference_batches`: the
  task's budgets for these sizes); each gets its own Stepper from the same seed (same
  initial parameters). Every budget is compiled before timing; then `rounds`
  alternating passes over each layout's batches. Real residues per second of a pass =
  the proteins' residues / the pass's summed step wall time.
  """
  from bihier_jax.data import layout  # pylint: disable=import-outside-toplevel
  examples = make_examples(testing.pdb_like_lengths(n, clip=(30, 1022)))
  residues = int(sum(ex.aatype.shape[0] for ex in examples))
  layouts = {}
  for pack, row_length in [(False, 0)] + [(True, r) for r in row_lengths]:
    config = bench_config(preset, batch_size=batch_size)
    config.data.pack_rows = pack
    config.data.row_length = row_length
    name = ("packed" if row_length == row_lengths[0] else f"packed_{row_length}"
            ) if pack else "unpacked"
    plan = layout.inference_batches(examples, config)
    batches = [layout.collate([examples[i] for i in members], budget)
               for budget, members in plan]
    stepper = Stepper(config, batches[0])
    for budget in dict.fromkeys(b.budget for b in batches):  # compile each shape
      stepper.step(next(b for b in batches if b.budget == budget))
    slots = sum(int(b.tokens.size) for b in batches)
    tokens = sum(int((b.tokens != rc.ESM_PAD).sum()) for b in batches)
    layouts[name] = {
        "stepper": stepper, "batches": batches, "passes": [],
        "token_efficiency": tokens / slots, "budgets": len({b.budget for b in batches}),
        "row_lengths": sorted({int(b.budget.row_length) for b in batches})}
  for _ in range(rounds):
    for entry in layouts.values():
      seconds = sum(entry["stepper"].step(b) for b in entry["batches"])
      entry["passes"].append(residues / seconds)
  out = {"preset": preset, "proteins": n, "residues": residues, "batch_size": batch_size,
         "threads": os.cpu_count()}
  for name, entry in layouts.items():
    out[name] = {"residues_per_s": statistics.median(entry["passes"]),
                 "passes": entry["passes"], "batches": len(entry["batches"]),
                 "budgets": entry["budgets"], "row_lengths": entry["row_lengths"],
                 "token_efficiency": entry["token_efficiency"]}
    if name != "unpacked":
      out[name]["speedup"] = statistics.median(
          p / u for p, u in zip(entry["passes"], layouts["unpacked"]["passes"]))
  out["packed_speedup"] = out["packed"]["speedup"]
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="tiny ESM, short lengths")
  p.add_argument("--json", default="", help="also write the results here")
  p.add_argument("--preset", default="", help="ESM-2 preset (default t6_8M; tiny "
                 "with --quick; t33_650M with --gpu)")
  p.add_argument("--max-length", type=int, default=0, help="longest ESM row "
                 "length bucket (default 1024; 256 with --quick)")
  p.add_argument("--batch-size", type=int, default=4, help="proteins per batch")
  p.add_argument("--steps", type=int, default=0, help="timed steps per measurement")
  p.add_argument("--gpu", action="store_true", help="the large-model GPU suite only")
  p.add_argument("--gpu-length", type=int, default=512)
  p.add_argument("--gpu-batch-size", type=int, default=8)
  p.add_argument("--gpu-timeout", type=int, default=1200)
  p.add_argument("--varlen", type=int, default=0, metavar="N",
                 help="only the packed-vs-bucketed fused step on N realistic lengths")
  p.add_argument("--rounds", type=int, default=3, help="alternating passes (--varlen)")
  p.add_argument("--row-lengths", default="0", help="packed row lengths to compare "
                 "(--varlen), comma-separated; 0 = the one the pipeline chooses")
  p.add_argument("--gpu-child", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--remat", dest="remat", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--no-remat", dest="remat", action="store_false", help=argparse.SUPPRESS)
  args = p.parse_args(argv)

  if args.gpu_child:
    print(json.dumps(gpu_child(args.remat, args.preset or "t33_650M", args.gpu_length,
                               args.gpu_batch_size, args.steps or 10)), flush=True)
    return 0

  results = {"backend": jax.default_backend(),
             "device": getattr(jax.devices()[0], "device_kind", str(jax.devices()[0]))}
  if args.varlen:
    results["varlen"] = varlen_step_speed(args.preset or "t12_35M", args.varlen,
                                          args.batch_size, args.rounds,
                                          tuple(int(r) for r in args.row_lengths.split(",")))
  elif args.gpu:
    if jax.default_backend() != "gpu":
      results["gpu"] = {"error": f"no GPU: backend is {jax.default_backend()}"}
    else:
      results["gpu"] = gpu_suite(args.preset or "t33_650M", args.gpu_length,
                                 args.gpu_batch_size, args.steps or 10,
                                 args.gpu_timeout)
  else:
    preset = args.preset or ("tiny" if args.quick else "t6_8M")
    max_length = args.max_length or (256 if args.quick else 1024)
    steps = args.steps or (2 if args.quick else 3)
    results["preset"] = preset
    results["batch_size"] = args.batch_size
    try:
      results.update(full_model_suite(preset, max_length, args.batch_size,
                                      8 if args.quick else 24, steps))
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc()
      results["error"] = f"{type(e).__name__}: {e}"

  text = json.dumps(results, indent=1)
  print(text)
  if args.json:
    with open(args.json, "w") as f:
      f.write(text + "\n")
  failed = "error" in results or any(
      isinstance(v, dict) and "error" in v for v in results.values())
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
