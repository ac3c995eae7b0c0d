"""Memory per device of a fused training step under parameter sharding (train.fsdp).

  python bench/bench_sharding.py --preset t36_3B --devices 4 --fsdp 4 --seq-len 1024 \\
      --json OUT.json
  python bench/bench_sharding.py --preset t48_15B --devices 32 --fsdp 32 --lora
  python bench/bench_sharding.py --preset t36_3B --lora --fit-gib 16   # fewest devices
  python bench/bench_sharding.py --quick      # t6_8M, 4 devices (bench/run_all.py --quick)
  python bench/bench_sharding.py --preset t33_650M --devices 1 --remat task   # one setting

What is measured. The trainer's own step (`steps.jit_train_step`: forward, backward,
gradient clipping, AdamW update, the in-graph non-finite guard) of the full bihier
model (ESM-2 `--preset`, 4 x 128 ProNet blocks, local+global fusion) is lowered and
compiled for `--devices` simulated CPU devices (`--xla_force_host_platform_device_count`)
with ABSTRACT parameters and batch: nothing is allocated, so a 15B model is measured on
a laptop. Settings: bfloat16 compute, one protein of `--seq-len` - 2 residues per device
(`train.batch_size` = devices), ESM fine-tuned (`--lora`: model.esm.trainable=lora, rank
8, q and v).

Remat. Every point is measured twice (`--remat both`, the default): with the task
configs' own `model.esm.remat` (configs/*.py as they ship: False) and with per-layer
rematerialisation (`model.esm.remat=True`, which config_check requires for
`train.fsdp` > 1 and the launchers' `--fsdp` set); `--remat task` or `--remat true`
measures one of them.

Reported (one JSON object; `--json` also writes it):
- per_device_gib: the compiled program's arguments + outputs + temporaries - aliased
  (donated) bytes, from `compiled.memory_analysis()`: what one device must hold at the
  step's peak. XLA's CPU buffer assignment stands in for the accelerator's; expect the
  same order, not the same byte (GPU/TPU fusion and layouts differ).
- state_gib_per_device: the training state's bytes on one device (parameters, Adam
  moments), from the shardings alone.
- all_gather_gib / reduce_scatter_gib / all_reduce_gib: bytes per step on one device,
  from the compiled HLO (collectives over groups of one device left out): each
  all-gather's and all-reduce's result, each
  reduce-scatter's input (result x group size), times the known trip count of each
  enclosing while loop (the scanned layers). XLA's CPU backend runs bfloat16
  collectives in float32 (it converts around them), so the all-gather bytes here are
  twice what a GPU or TPU moves for the same bfloat16 gather.
- matmul_tflop: the step's matmul FLOPs summed over devices (`flops.matmul_flops`).
- rows: one object per measured step (its "remat" field says which); a single point
  gives one or two rows.
- With `--fit-gib G`: devices 1, 2, 4, ... (fsdp = devices) until the remat=True row
  fits (per_device_gib <= G); `fewest_devices` is that count, `fewest_devices_task_remat`
  the fewest tried at which the task configs' setting fits (None if none did; with more
  than one device it is refused, see above).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time


def _device_count_from_argv(argv) -> int:
  """--devices N (default 8), or the largest count a --fit-gib search may try."""
  if any(a == "--fit-gib" or a.startswith("--fit-gib=") for a in argv):
    return 64
  for i, arg in enumerate(argv):
    if arg == "--devices" and i + 1 < len(argv):
      return int(argv[i + 1])
    if arg.startswith("--devices="):
      return int(arg.split("=", 1)[1])
  return 8


if __name__ == "__main__":
  # Simulated devices must be set before JAX starts (run as a script only: imported,
  # e.g. by a test for collective_bytes, the module leaves the environment alone).
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_"
                             f"platform_device_count={_device_count_from_argv(sys.argv)}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from bench import common  # pylint: disable=wrong-import-position

GIB = 2.0 ** 30
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_COLLECTIVES = {"all-gather": "all_gather", "all-gather-start": "all_gather",
                "reduce-scatter": "reduce_scatter", "all-reduce": "all_reduce",
                "all-reduce-start": "all_reduce"}


# --- collectives in the compiled HLO ----------------------------------------------------

def _shape_bytes(text: str) -> int:
  """Bytes of every array shape in an HLO result type, e.g. '(f32[4,8]{1,0}, bf16[2])'."""
  total = 0
  for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", text):
    if dtype in _DTYPE_BYTES:
      total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
  return total


def _group_size(line: str) -> int:
  """Devices per replica group of a collective: 'replica_groups={{0,1,2,3},...}' or the
  iota form 'replica_groups=[groups,size]<=[...]'."""
  iota = re.search(r"replica_groups=\[\d+,(\d+)\]", line)
  if iota:
    return int(iota.group(1))
  listed = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
  if listed:
    return len(listed.group(1).split(","))
  axes = re.search(r"replica_groups=mesh\[([^\]]*)\]", line)  # named-axes form
  if axes:
    return math.prod(int(n) for n in re.findall(r"=(\d+)", axes.group(1)))
  return 1


def collective_bytes(hlo_text: str) -> dict[str, int]:
  """Bytes produced per program run by all-gather / reduce-scatter / all-reduce.

  Every computation's own collectives, plus those of the computations it calls:
  while bodies times their known trip count (XLA records it in the while's
  backend_config; 1 when unknown), conditional branches at their dearest, everything
  else (fusions, calls, reductions' to_apply) once.
  """
  computations: dict[str, list[str]] = {}
  entry, name = None, None
  for line in hlo_text.splitlines():
    header = re.match(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
    if header and not line.startswith(" "):
      name = header.group(2)
      computations[name] = []
      if header.group(1):
        entry = name
    elif name is not None and line.strip() and line.strip() != "}":
      computations[name].append(line)
  memo: dict[str, dict[str, int]] = {}

  def total(comp: str) -> dict[str, int]:
    if comp in memo:
      return memo[comp]
    memo[comp] = sums = {"all_gather": 0, "reduce_scatter": 0, "all_reduce": 0}
    for line in computations.get(comp, []):
      op = re.match(r"^\s*(ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s([\w\-]+)\(", line)
      if op and op.group(3) in _COLLECTIVES:
        kind = _COLLECTIVES[op.group(3)]
        group = _group_size(line)
        if group > 1:  # groups of one device move nothing
          # A reduce-scatter's result is one piece: the bytes reduced are group x it.
          scale = group if kind == "reduce_scatter" else 1
          sums[kind] += scale * _shape_bytes(op.group(2))
      trips = 1
      if op and op.group(3) == "while":
        known = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
        trips = int(known.group(1)) if known else 1
      called = re.findall(r"(?:body|calls|to_apply)=%?([\w.\-]+)", line)
      branches = re.search(r"branch_computations=\{([^}]*)\}", line)
      for child in called:
        for k, v in total(child).items():
          sums[k] += trips * v
      if branches:
        options = [total(c.strip().lstrip("%")) for c in branches.group(1).split(",")]
        for k in sums:
          sums[k] += max(o[k] for o in options)
    return sums

  return total(entry) if entry else {"all_gather": 0, "reduce_scatter": 0,
                                     "all_reduce": 0}


# --- the measured step ------------------------------------------------------------------

def task_config_remat() -> bool:
  """`model.esm.remat` of every task config as it ships (configs/<task>.py of each
  task `data_pipelines.download` knows); they must agree."""
  import importlib  # pylint: disable=import-outside-toplevel
  from data_pipelines import download  # pylint: disable=import-outside-toplevel
  values = {task: bool(importlib.import_module(f"configs.{task}").get_config()
                       .model.esm.remat) for task in download.TASKS}
  if len(set(values.values())) != 1:
    raise SystemExit(f"the task configs disagree on model.esm.remat: {values}")
  return next(iter(values.values()))


def bench_config(preset: str, devices: int, fsdp: int, lora: bool, remat: bool):
  from configs import default  # pylint: disable=import-outside-toplevel
  config = default.get_config()
  config.model.kind = "bihier"
  config.model.esm.preset = preset
  config.model.esm.checkpoint = ""
  config.model.esm.remat = remat
  config.model.dtype = "bfloat16"
  config.model.gnn.num_blocks = 4
  config.model.gnn.hidden = 128
  config.model.esm.trainable = "lora" if lora else "finetune"
  config.train.batch_size = devices
  config.train.fsdp = fsdp
  return config


def measure(preset: str, devices: int, fsdp: int, seq_len: int, lora: bool,
            remat: bool) -> dict:
  """One compiled step; see the module docstring for the fields."""
  from bihier_jax.common import flops  # pylint: disable=import-outside-toplevel
  from bihier_jax import testing
  from bihier_jax.data import layout  # pylint: disable=import-outside-toplevel
  from bihier_jax import models  # pylint: disable=import-outside-toplevel
  from bihier_jax.training import device_batches, mesh as mesh_lib, optim, steps, train_state  # pylint: disable=import-outside-toplevel
  config = bench_config(preset, devices, fsdp, lora, remat)
  mesh = mesh_lib.make_mesh(jax.devices()[:devices], fsdp)
  example = testing.random_example(seq_len - 2, seed=0)
  budget = layout.budget_for([example])
  sub = layout.collate([example], budget)
  stacked = device_batches.stack([sub] * devices)
  batch = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=mesh_lib.batch_sharding(mesh)), stacked)
  model = models.build_model(config)
  state = train_state.abstract_train_state(config, model, sub, mesh)
  tx = optim.make_optimizer(config)
  train_fn = steps.jit_train_step(model, tx, config.task, mesh, state)
  start = time.perf_counter()
  compiled = train_fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  mem = compiled.memory_analysis()
  per_device = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
  state_bytes = 0
  for leaf in jax.tree_util.tree_leaves(state):
    shard = leaf.sharding.shard_shape(leaf.shape)
    state_bytes += math.prod(shard) * np.dtype(leaf.dtype).itemsize
  collectives = collective_bytes(compiled.as_text())
  trained, total = model.config.trainable.count(state.params)
  return {
      "preset": preset, "devices": devices, "fsdp": fsdp, "data": devices // fsdp,
      "seq_len": seq_len, "esm_budget_row_length": int(budget.row_length),
      "trainable": config.model.esm.trainable, "dtype": "bfloat16", "remat": remat,
      "parameters": int(total), "trainable_parameters": int(trained),
      "per_device_gib": per_device / GIB,
      "state_gib_per_device": state_bytes / GIB,
      "argument_gib": mem.argument_size_in_bytes / GIB,
      "output_gib": mem.output_size_in_bytes / GIB,
      "temp_gib": mem.temp_size_in_bytes / GIB,
      "alias_gib": mem.alias_size_in_bytes / GIB,
      **{f"{k}_gib": v / GIB for k, v in collectives.items()},
      "matmul_tflop": flops.matmul_flops(train_fn, state, batch) / 1e12,
      "compile_s": compile_s,
  }


def _remat_settings(choice: str) -> list[bool]:
  """The remat values to measure for --remat task | true | both (task first)."""
  task = task_config_remat()
  return {"task": [task], "true": [True],
          "both": [task] if task else [task, True]}[choice]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="t36_3B")
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--fsdp", type=int, default=0, help="default: --devices")
  parser.add_argument("--seq-len", type=int, default=1024,
                      help="ESM row length L (one protein of L - 2 residues per device)")
  parser.add_argument("--lora", action="store_true")
  parser.add_argument("--remat", choices=("both", "task", "true"), default="both",
                      help="model.esm.remat of the task configs, True, or both")
  parser.add_argument("--fit-gib", type=float, default=0.0,
                      help="find the fewest devices (fsdp = devices) within this memory")
  parser.add_argument("--json", default="")
  parser.add_argument("--quick", action="store_true",
                      help="t6_8M on 4 devices, fsdp 4, L = 256 (a smoke run)")
  args = parser.parse_args(argv)
  if args.quick:
    args.preset, args.devices, args.fsdp, args.seq_len = "t6_8M", 4, 4, 256
  settings = _remat_settings(args.remat)

  def point(devices: int, fsdp: int) -> list[dict]:
    rows = [measure(args.preset, devices, fsdp, args.seq_len, args.lora, remat)
            for remat in settings]
    for row in rows:
      print(json.dumps(row), flush=True)
    return rows

  result = {"task_config_remat": task_config_remat()}
  if args.fit_gib:
    rows, devices = [], 1
    fits = lambda remat: [r["devices"] for r in rows
                          if r["remat"] == remat and r["per_device_gib"] <= args.fit_gib]
    while devices <= jax.device_count():
      rows += point(devices, devices)
      if fits(settings[-1]):
        break
      devices *= 2
    result.update(fit_gib=args.fit_gib, fewest_devices=min(fits(settings[-1]), default=None),
                  fewest_devices_task_remat=min(fits(settings[0]), default=None), rows=rows)
  else:
    result["rows"] = point(args.devices, args.fsdp or args.devices)
  result["machine"] = {"jax": jax.__version__, "backend": "cpu (simulated devices)"}
  print(json.dumps(result, indent=1))
  common.write_json(args.json, result)
  return 0


if __name__ == "__main__":
  sys.exit(main())
