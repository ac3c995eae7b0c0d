"""ESM-2 on an accelerator: bf16 throughput and MFU, packed rows per attention kind, and
the splash kernel's visited blocks on the pipeline's packed rows.

  python bench/bench_esm2_gpu.py [--quick] [--batch B] [--peak-tflops T] [--json PATH]
  python bench/bench_esm2_gpu.py --splash-blocks [--quick] [--json PATH]  # any backend

bf16 compute (fp32 params) t33_650M forward, L = 512. Model FLOPs per forward =
tokens * layers * `flops.esm_matmul_flops(L, D, F)` = 2 * P_matmul * tokens + 4 * L^2 *
D * layers * batch, with P_matmul = layers * (4 D^2 + 2 D F) (q, k, v, out and the two
FFN matrices; embeddings, norms, biases and softmax not counted). MFU = FLOPs / time /
peak dense bf16 FLOP/s of the device (--peak-tflops, default from the device name:
H100/H200 989). Without an accelerator only --splash-blocks runs; the rest is skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import common  # noqa: E402  # pylint: disable=wrong-import-position

common.setup()

# pylint: disable=wrong-import-position
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import esm2_inputs  # noqa: E402
from bihier_jax.common import flops as flops_lib  # noqa: E402
from bihier_jax.common import residue_constants as rc  # noqa: E402
from bihier_jax.models import esm2  # noqa: E402
# pylint: enable=wrong-import-position


def model_flops(cfg: esm2.ESM2Config, batch: int, length: int) -> float:
  """Forward FLOPs of `batch` rows of `length` tokens (`flops.esm_matmul_flops`)."""
  return float(batch * length * cfg.num_layers
               * flops_lib.esm_matmul_flops(length, cfg.embed_dim, cfg.ffn_dim))


def gpu_throughput(preset: str, batch: int, length: int, repeats: int, peak_tflops: float | None,
                   attention: str) -> dict:
  device = jax.devices()[0]
  cfg = esm2.config_from_preset(preset, dtype=jnp.bfloat16, mlm_head=False, attention=attention)
  model = esm2.ESM2(cfg)
  params = jax.jit(lambda: esm2.init_params(cfg))()
  tokens = jnp.asarray(esm2_inputs.random_tokens(batch, length))
  fwd = jax.jit(lambda p, t: model.apply({"params": p}, t,
                                         output_hidden_states=False).last_hidden_state)
  start = time.perf_counter()
  fwd(params, tokens).block_until_ready()
  compile_s = time.perf_counter() - start
  seconds = common.timed(lambda: fwd(params, tokens).block_until_ready(), repeats)
  flops = model_flops(cfg, batch, length)
  if peak_tflops is None:
    peak = flops_lib.peak_bf16_flops(device)
    peak_tflops = None if peak is None else peak / 1e12
  achieved = flops / seconds / 1e12
  return {"device": device.device_kind, "platform": device.platform, "preset": preset,
          "attention": attention, "dtype": "bfloat16", "batch": batch, "length": length,
          "first_call_s": compile_s, "step_ms": seconds * 1e3,
          "tokens_per_s": batch * length / seconds, "model_tflops_per_forward": flops / 1e12,
          "achieved_tflops": achieved, "peak_tflops": peak_tflops,
          "mfu": achieved / peak_tflops if peak_tflops else None,
          "flops_formula": "2*P_matmul*tokens + 4*L^2*D*layers*batch, "
                           "P_matmul = layers*(4*D^2 + 2*D*F)"}


def gpu_packed_forward(preset: str, n: int, repeats: int) -> list[dict]:
  """bf16 forward and forward + backward of `n` realistic chains packed into 768-token
  rows (the chains that fit; one call), per attention kind: 'auto' (dense same-chain
  mask through jax.nn.dot_product_attention), 'flash_gpu' (Pallas Triton flash attention
  with segment ids) and 'exact'; real tokens/s and max |kind - exact| at real tokens."""
  cfg = esm2.config_from_preset(preset, dtype=jnp.bfloat16, mlm_head=False)
  params = jax.jit(lambda: esm2.init_params(cfg))()
  lengths = esm2_inputs.chain_lengths(n)
  lengths = lengths[lengths + 2 <= 768]
  chains = [esm2_inputs.random_tokens(1, int(k) + 2, seed=i)[0] for i, k in enumerate(lengths)]
  _, (tok, seg, _) = esm2_inputs.packed_rows(chains, 768)[0]
  real = int((seg >= 0).sum())
  tok, seg = jnp.asarray(tok), jnp.asarray(seg)
  rows, outs = [], {}
  for kind in ("exact", "auto", "flash_gpu"):
    model = esm2.ESM2(dataclasses.replace(cfg, attention=kind))
    fwd = jax.jit(lambda p, t, s, model=model: model.apply(
        {"params": p}, t, segments=s, output_hidden_states=False).last_hidden_state)
    loss = lambda p, t, s, fwd=fwd: jnp.sum(fwd(p, t, s).astype(jnp.float32) * (s >= 0)[..., None])
    grad = jax.jit(jax.grad(loss))
    row = {"device": jax.devices()[0].device_kind, "preset": preset, "attention": kind,
           "rows": list(tok.shape), "real_tokens": real}
    try:
      outs[kind] = np.asarray(fwd(params, tok, seg), np.float32)
      row["forward_ms"] = 1e3 * common.timed(lambda: fwd(params, tok, seg).block_until_ready(),
                                      repeats)
      row["grad_ms"] = 1e3 * common.timed(lambda: jax.block_until_ready(grad(params, tok, seg)),
                                   repeats)
      row["forward_real_tokens_per_s"] = real / row["forward_ms"] * 1e3
      row["max_abs_diff_vs_exact"] = float(np.abs(
          outs[kind] - outs["exact"])[np.asarray(seg) >= 0].max())
    except Exception as e:  # pylint: disable=broad-except  # a kernel the device refuses
      row["error"] = f"{type(e).__name__}: {e}"[:500]
    rows.append(row)
  return rows


def gpu_attention_check() -> dict:
  """Max |auto - exact| of the last hidden state, bf16 t12_35M shape, padded batch."""
  cfg = esm2.config_from_preset("t12_35M", dtype=jnp.bfloat16, mlm_head=False)
  params = jax.jit(lambda: esm2.init_params(cfg))()
  tokens = esm2.tokenize(["MKTAYIAKQRQISFVKSHFSRQ" * 10, "ACDEFGHIKLMNPQRSTVWY" * 3, ""])
  mask = tokens != rc.ESM_PAD
  outs = {}
  for attention in ("auto", "exact"):
    model = esm2.ESM2(dataclasses.replace(cfg, attention=attention))
    outs[attention] = np.asarray(jax.jit(lambda p, t, model=model: model.apply(
        {"params": p}, t, output_hidden_states=False).last_hidden_state)(params, tokens),
        np.float32)
  diff = np.abs(outs["auto"] - outs["exact"])[mask]
  return {"max_abs_diff_real_tokens": float(diff.max()), "finite": bool(
      np.isfinite(outs["auto"]).all()), "scale": float(np.abs(outs["exact"][mask]).max())}


def _pipeline_rows(lengths: np.ndarray, row_length: int, batch_size: int,
                   seed: int = 0) -> dict[int, np.ndarray]:
  """Segment ids int32[R, L] (-1 at padding) of every row of every batch the input
  pipeline makes of single chains of `lengths` residues in a random stream order:
  `budgets.bucket_budgets` (packed rows of `row_length`, longer chains in the
  1,024-token bucket; batch padding rows included) and `packing.plan_batches`, per
  row length."""
  from bihier_jax.data import budgets as budgets_lib  # pylint: disable=import-outside-toplevel
  from bihier_jax.data import packing  # pylint: disable=import-outside-toplevel
  from configs import default  # pylint: disable=import-outside-toplevel
  config = default.get_config()
  config.data.pack_rows, config.data.row_length = True, row_length
  config.train.batch_size = batch_size
  edges = lengths * 16  # a residue graph's edges per node; only budgets' n_edge sees it
  sizes = np.stack([lengths, lengths, np.ones_like(lengths), edges], 1)
  budgets = budgets_lib.bucket_budgets(config, sizes)
  order = np.random.default_rng(seed).permutation(len(lengths))
  home = {int(i): next(b for b, budget in enumerate(budgets) if packing.oversize(
      int(lengths[i]), int(edges[i]), [int(lengths[i]) + 2], budget) is None)
          for i in order}
  out = {}
  for b, budget in enumerate(budgets):
    members = [i for i in order if home[int(i)] == b]
    if not members:
      continue
    plan = packing.plan_batches(lengths[members], edges[members], np.ones(len(members)),
                                lengths[members] + 2, budget)
    ids = np.full((plan.num_batches, budget.n_row, budget.row_length), -1, np.int32)
    for k, i in enumerate(members):
      start = plan.column[k]
      ids[plan.batch[k], plan.row[k], start:start + lengths[i] + 2] = k
    out[budget.row_length] = ids.reshape(-1, budget.row_length)
  return out


def splash_blocks(n: int, row_length: int = 768, batch_size: int = 32,
                  seed: int = 0) -> dict:
  """The (query block, key block) pairs the splash kernel computes on the rows the
  input pipeline packs `n` realistic chains into (`_pipeline_rows`), against all
  (L / 128)² per row, per row length. The counts are read from the block mask of the
  kernel each row gets (`attention_backends._splash_kernel`: its forward, dq and dk/dv
  kernels share it); no kernel runs. Also the same-chain (query, key) pairs of real tokens over L x L:
  what only elementwise skipping would leave."""
  from bihier_jax.common import esm_shapes  # pylint: disable=import-outside-toplevel
  from bihier_jax.models import attention_backends  # pylint: disable=import-outside-toplevel
  out = {}
  for length, ids in _pipeline_rows(esm2_inputs.chain_lengths(n, seed), row_length, batch_size,
                                    seed).items():
    rows = ids.shape[0]
    visits = attention_backends.block_visits(jnp.asarray(ids), esm_shapes.PALLAS_BLOCK)
    block_mask = jax.vmap(lambda v: attention_backends._splash_kernel(v, True).fwd_mask_info.block_mask)(  # pylint: disable=protected-access
        visits)
    visited = int((np.asarray(block_mask) > 0).sum())
    blocks = rows * (length // esm_shapes.PALLAS_BLOCK) ** 2
    same = (ids[:, :, None] == ids[:, None, :]) & (ids >= 0)[:, :, None]
    out[length] = {"rows": rows, "empty_rows": int((ids < 0).all(1).sum()),
                   "chains": sum(len(set(row[row >= 0])) for row in ids),
                   "real_tokens": int((ids >= 0).sum()), "blocks": blocks,
                   "visited_blocks": visited, "visited_fraction": visited / blocks,
                   "same_chain_pair_fraction": float(same.sum()) / (rows * length ** 2)}
  total = sum(r["blocks"] for r in out.values())
  visited = sum(r["visited_blocks"] for r in out.values())
  out["all"] = {"rows": sum(r["rows"] for r in out.values()), "blocks": total,
                "visited_blocks": visited, "visited_fraction": visited / total}
  return out


def accelerator(args) -> dict:
  """Forward throughput per attention kind, auto vs exact, packed rows per kind."""
  results = {}
  batch = args.batch or (4 if args.quick else 32)
  rows = []
  for attention in ("auto", "exact"):
    try:
      rows.append(gpu_throughput("t33_650M", batch, 512, 5 if args.quick else 20,
                                 args.peak_tflops, attention))
    except Exception as e:  # pylint: disable=broad-except
      rows.append({"attention": attention, "error": f"{type(e).__name__}: {e}"[:500]})
  results["gpu_forward"] = rows
  try:
    results["gpu_attention_check"] = gpu_attention_check()
  except Exception as e:  # pylint: disable=broad-except
    results["gpu_attention_check"] = {"error": f"{type(e).__name__}: {e}"[:500]}
  print("auto vs exact attention (bf16, padded):", results["gpu_attention_check"])
  results["gpu_packed_forward"] = gpu_packed_forward(
      "t12_35M" if args.quick else "t33_650M", 64 if args.quick else 256,
      3 if args.quick else 10)
  print("\npacked 768-token rows, bf16, per attention kind")
  common.print_table(results["gpu_packed_forward"],
                     ["device", "preset", "attention", "rows", "forward_ms", "grad_ms",
                      "forward_real_tokens_per_s", "max_abs_diff_vs_exact", "error"])
  common.print_table(rows, ["device", "attention", "batch", "length", "step_ms",
                            "tokens_per_s", "achieved_tflops", "mfu", "error"])
  return results


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="fewer repeats / smaller cases")
  parser.add_argument("--json", help="write the results dict here")
  parser.add_argument("--batch", type=int, default=None)
  parser.add_argument("--peak-tflops", type=float, default=None)
  parser.add_argument("--splash-blocks", action="store_true",
                      help="only the splash kernel's visited blocks on packed rows")
  args = parser.parse_args(argv)
  results = common.run_info()
  if args.splash_blocks:
    n = 512 if args.quick else 4096
    counts = splash_blocks(n)
    results["splash_blocks"] = counts
    print(f"splash blocks computed on the pipeline's batches of {n} realistic chains "
          "(768-token packed rows, longer chains in 1,024-token rows; batch 32)")
    common.print_table([{"row_length": k, **v} for k, v in counts.items()],
                       ["row_length", "rows", "empty_rows", "chains", "real_tokens",
                        "blocks", "visited_blocks", "visited_fraction",
                        "same_chain_pair_fraction"])
  elif jax.default_backend() == "cpu":
    results["skipped"] = "no accelerator (run on a GPU or TPU host)"
    print(results["skipped"])
  else:
    results.update(accelerator(args))
  common.write_json(args.json, results, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
