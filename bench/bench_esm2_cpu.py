"""ESM-2 port on CPU: forward speed against transformers, at uniform and realistic lengths.

  python bench/bench_esm2_cpu.py [--quick] [--threads N] [--json PATH]
  python bench/bench_esm2_cpu.py --varlen [--quick] [--json PATH]   # realistic lengths only

CPU speed: forward tokens/s of the port (jit) and of transformers' PyTorch `EsmModel`
(default attention, inference_mode, torch.set_num_threads(2)) with the same random
weights, batch 8 x 256 tokens, no padding, measured side by side in one process in
interleaved rounds; the speedup is the median of per-round ratios. On a shared machine
PyTorch's OpenMP threads suffer more from oversubscription than XLA's: `--threads 1`
(both single-threaded) gives a comparison that is robust to load.
Variable lengths (--varlen): 48 sequences drawn from PDB-like lengths
(`testing.pdb_like_lengths`, cropped to 1,022), same random weights: transformers sorted
by length in batches of 8 padded to the batch's longest, the port on packed rows (several
chains per row, segment ids; the row length the input pipeline chooses for the preset,
longer chains in 512/768/1024 buckets; laid out by the production packer, longest chain
first), one jitted call per row-length bucket.
In the same alternating rounds, with the same weights: the port before packing (one
chain per row in its 128/256/512/1024 bucket, up to 8 rows per call;
`speedup_vs_bucketed`) and both engines on uniform 8 x 256 rows
(`uniform_speedup_vs_transformers`: the host's engine-against-engine ratio when neither
pads, which bounds what packing can show against transformers). The speedup is the
median of per-round ratios. Also the token-slot efficiency of each layout (real tokens /
slots), and one layer's attention on the packed
768-token rows: key windows (`attention.segment_attention`, forward and backward) vs the
whole row with a same-chain mask, forward and forward + backward, and the compiled
temporary memory of each forward + backward.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import common  # noqa: E402  # pylint: disable=wrong-import-position


def _threads_from_argv(argv) -> int:
  """--threads N (read before jax is imported: XLA's CPU thread pool is fixed at start)."""
  pre = argparse.ArgumentParser(add_help=False)
  pre.add_argument("--threads", type=int, default=2)
  return pre.parse_known_args(argv)[0].threads


THREADS = _threads_from_argv(sys.argv[1:])
common.setup(threads=THREADS)

# pylint: disable=wrong-import-position
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import esm2_inputs  # noqa: E402
from bihier_jax.common import residue_constants as rc  # noqa: E402
from bihier_jax.models import esm2  # noqa: E402
# pylint: enable=wrong-import-position


def reference_and_params(preset: str):
  """(transformers EsmModel with random weights, eval mode; the same weights as the
  port's params) for `preset`, torch at THREADS threads."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from bihier_jax.models.esm2 import checkpoint as esm2_checkpoint  # pylint: disable=import-outside-toplevel

  torch.set_num_threads(THREADS)
  cfg = esm2.config_from_preset(preset, mlm_head=False)
  hf_config = transformers.EsmConfig(
      vocab_size=33, hidden_size=cfg.embed_dim, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, intermediate_size=cfg.ffn_dim,
      position_embedding_type="rotary", token_dropout=True, emb_layer_norm_before=False,
      mask_token_id=rc.ESM_MASK, pad_token_id=rc.ESM_PAD, max_position_embeddings=1026,
      layer_norm_eps=cfg.layer_norm_eps)  # EsmConfig defaults to 1e-12; ESM-2 uses 1e-5
  torch.manual_seed(0)
  reference = transformers.EsmModel(hf_config, add_pooling_layer=False).eval()
  state = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
  # pylint: disable=protected-access
  params = esm2_checkpoint.params_from_torch(
      state, cfg, esm2_checkpoint._HF_LAYER, esm2_checkpoint._HF_TOP,
      esm2_checkpoint._HF_IGNORED, "bench")
  # pylint: enable=protected-access
  return reference, jax.tree.map(jnp.asarray, params)


def cpu_speed(preset: str, batch: int, length: int, repeats: int, variants) -> dict:
  import torch  # pylint: disable=import-outside-toplevel

  reference, params = reference_and_params(preset)
  tokens = esm2_inputs.random_tokens(batch, length)
  t_tokens = torch.from_numpy(tokens).long()
  t_mask = torch.ones_like(t_tokens)

  def run_torch():
    with torch.inference_mode():
      return reference(t_tokens, attention_mask=t_mask).last_hidden_state

  ref_out = run_torch().numpy()
  result = {"preset": preset, "batch": batch, "length": length}
  j_tokens = jnp.asarray(tokens)
  forwards = {}
  for name, overrides in variants.items():
    model = esm2.ESM2(esm2.config_from_preset(preset, mlm_head=False, **overrides))
    fwd = jax.jit(lambda p, t, model=model: model.apply(
        {"params": p}, t, output_hidden_states=False).last_hidden_state)
    start = time.perf_counter()
    out = fwd(params, j_tokens).block_until_ready()
    result[name] = {"first_call_s": time.perf_counter() - start,
                    "max_abs_diff_vs_transformers": float(
                        np.max(np.abs(np.asarray(out) - ref_out)))}
    forwards[name] = lambda fwd=fwd: fwd(params, j_tokens).block_until_ready()
  # Interleaved rounds (transformers, then each variant): on a shared machine the load
  # changes over minutes, so each round's speedup compares runs made seconds apart.
  for fn in (run_torch, *forwards.values()):
    fn()
  times = common.alternating_rounds({"transformers": run_torch, **forwards}, repeats)
  torch_s = statistics.median(times["transformers"])
  result["transformers_tokens_per_s"] = batch * length / torch_s
  for name in forwards:
    result[name].update(
        tokens_per_s=batch * length / statistics.median(times[name]),
        speedup_vs_transformers=common.median_ratio(times, "transformers", name))
  return result


def varlen_speed(preset: str, n: int, repeats: int, seed: int = 0) -> dict:
  """Forward over `n` sequences of realistic lengths (same random weights): the port on
  packed rows (one jitted call per row-length bucket) vs transformers sorted by length,
  batches of 8 padded to the batch's longest."""
  import torch  # pylint: disable=import-outside-toplevel
  from bihier_jax.data import budgets as budgets_lib  # pylint: disable=import-outside-toplevel

  cfg = esm2.config_from_preset(preset, mlm_head=False)
  reference, params = reference_and_params(preset)
  lengths = esm2_inputs.chain_lengths(n, seed)
  rng = np.random.default_rng(seed + 1)
  chains = [esm2_inputs.random_tokens(1, int(k) + 2, seed=int(rng.integers(1 << 30)))[0]
            for k in lengths]

  # transformers: sorted by length, batches of 8 padded to the batch's longest.
  order = np.argsort(lengths, kind="stable")
  torch_batches = []
  for start in range(0, n, 8):
    idx = order[start:start + 8]
    width = max(len(chains[i]) for i in idx)
    tok = np.full((len(idx), width), rc.ESM_PAD, np.int64)
    for r, i in enumerate(idx):
      tok[r, :len(chains[i])] = chains[i]
    torch_batches.append((idx, torch.from_numpy(tok), torch.from_numpy(
        (tok != rc.ESM_PAD).astype(np.int64))))

  def run_torch():
    outs = {}
    with torch.inference_mode():
      for idx, tok, mask in torch_batches:
        h = reference(tok, attention_mask=mask).last_hidden_state.numpy()
        for r, i in enumerate(idx):
          outs[int(i)] = h[r, :len(chains[i])]
    return outs

  # Port: packed rows of the row length the pipeline would choose for this preset.
  # (chosen on 4,000 lengths of the same distribution, as the pipeline chooses on a
  # dataset's sizes.json, for batches of 8 proteins)
  pool = esm2_inputs.chain_lengths(4000, seed + 2)
  sizes = np.stack([pool, pool, np.ones_like(pool), 16 * pool], 1)
  row_length = budgets_lib.choose_row_length(sizes, cfg.embed_dim, cfg.ffn_dim,
                                             batch_size=8)
  model = esm2.ESM2(cfg)
  fwd = jax.jit(lambda p, t, s: model.apply({"params": p}, t, output_hidden_states=False,
                                            segments=s).last_hidden_state)
  packed = [(jnp.asarray(tok), jnp.asarray(seg), where) for _, (tok, seg, where)
            in esm2_inputs.packed_rows(chains, row_length, (512, 768, 1024))]

  def run_port(batches):
    outs = {}
    for tok, seg, where in batches:
      h = np.asarray(fwd(params, tok, seg).block_until_ready())
      for i, r, col in where:
        outs[i] = h[r, col:col + len(chains[i])]
    return outs

  # The port before packing: one chain per row, rows of its length bucket, up to 8 rows
  # per call, chains sorted by length (no segments: the unpacked path).
  buckets = (128, 256, 512, 1024)
  bucket_of = [next(b for b in buckets if b >= len(c)) for c in chains]
  bucketed = []
  for length in buckets:
    members = [int(i) for i in order if bucket_of[i] == length]
    for tok, _, where in (esm2_inputs.row_batches(chains, members, length, 8, packed=False)
                          if members else []):
      bucketed.append((jnp.asarray(tok), None, where))
  assert sum(len(w) for _, _, w in bucketed) == n

  # Uniform rows, same weights, same rounds: how the two engines compare on this host
  # when neither pads (the varlen speed-up's ceiling is this times the slot ratio).
  uniform = esm2_inputs.random_tokens(8, 256, seed)
  uniform_t, uniform_j = torch.from_numpy(uniform).long(), jnp.asarray(uniform)

  def run_torch_uniform():
    with torch.inference_mode():
      return reference(uniform_t, attention_mask=torch.ones_like(uniform_t))

  runs = {"transformers": run_torch, "port": lambda: run_port(packed),
          "port_bucketed": lambda: run_port(bucketed),
          "uniform_transformers": run_torch_uniform,
          "uniform_port": lambda: fwd(params, uniform_j, None).block_until_ready()}
  want, got, got_bucketed = run_torch(), runs["port"](), runs["port_bucketed"]()
  diff = max(float(np.max(np.abs(want[i] - got[i]))) for i in range(n))
  diff_bucketed = max(float(np.max(np.abs(want[i] - got_bucketed[i]))) for i in range(n))
  runs["uniform_transformers"]()
  runs["uniform_port"]()
  times = common.alternating_rounds(runs, repeats)
  ratio = lambda a, b: common.median_ratio(times, a, b)
  real = int(sum(len(c) for c in chains))
  slots = lambda batches: sum(int(t.size) for t, _, _ in batches)
  torch_slots = sum(int(t.numel()) for _, t, _ in torch_batches)
  return {
      "preset": preset, "sequences": n, "real_tokens": real,
      "row_length": int(row_length), "port_shapes": [[int(t.shape[0]), int(t.shape[1])]
                                                     for t, _, _ in packed],
      "port_token_efficiency": real / slots(packed),
      "bucketed_token_efficiency": real / slots(bucketed),
      "transformers_token_efficiency": real / torch_slots,
      "transformers_s": statistics.median(times["transformers"]),
      "port_s": statistics.median(times["port"]),
      "port_bucketed_s": statistics.median(times["port_bucketed"]),
      "speedup_vs_transformers": ratio("transformers", "port"),
      "bucketed_speedup_vs_transformers": ratio("transformers", "port_bucketed"),
      "speedup_vs_bucketed": ratio("port_bucketed", "port"),
      "uniform_speedup_vs_transformers": ratio("uniform_transformers", "uniform_port"),
      "max_abs_diff_vs_transformers": max(diff, diff_bucketed),
  }


def packed_attention_ab(preset: str, n: int, repeats: int, seed: int = 0) -> dict:
  """One layer's attention on the packed rows `varlen_speed` builds (the rows of the
  chosen length, the preset's heads, random q/k/v): `attention.segment_attention`
  (key windows, forward and backward) vs `attention.masked_attention` with the
  same-chain mask over the whole row; forward and forward + backward, alternating
  rounds, and the compiled temporary memory of each forward + backward."""
  from bihier_jax.models import attention  # pylint: disable=import-outside-toplevel
  cfg = esm2.config_from_preset(preset, mlm_head=False)
  lengths = esm2_inputs.chain_lengths(n, seed)
  chains = [np.zeros(int(n) + 2, np.int32) for n in lengths]  # only the layout counts
  _, (_, ids, _) = esm2_inputs.packed_rows(chains, 768, (1024,))[0]
  shape = ids.shape + (cfg.num_heads, cfg.head_dim)
  rng = np.random.default_rng(seed)
  q, k, v, g = (jnp.asarray(rng.normal(size=shape) * 0.3, jnp.float32) for _ in range(4))
  ids = jnp.asarray(ids)

  def same_chain(ids):
    return attention.mask_bias(
        (ids[:, None, :, None] == ids[:, None, None, :]) & (ids >= 0)[:, None, None, :])

  def whole(q, k, v, ids):
    return attention.masked_attention(q, k, v, same_chain(ids))

  def windows(q, k, v, ids):
    return attention.segment_attention(q, k, v, ids)

  grad = lambda f: jax.jit(jax.grad(lambda q, k, v, ids: jnp.sum(f(q, k, v, ids) * g),
                                    (0, 1, 2)))
  fns = {"whole_row_forward": jax.jit(whole),
         "windows_forward": jax.jit(windows),
         "whole_row_grad": grad(whole),
         "windows_grad": grad(windows)}
  times = common.alternating_rounds(  # the first round compiles
      {name: lambda fn=fn: jax.block_until_ready(fn(q, k, v, ids))
       for name, fn in fns.items()}, repeats + 1)
  result = {name: statistics.median(t[1:]) for name, t in times.items()}
  temp_mib = lambda fn: fn.lower(q, k, v, ids).compile().memory_analysis(
      ).temp_size_in_bytes / 2**20
  result.update(preset=preset, rows=list(shape[:2]),
                forward_speedup=result["whole_row_forward"] / result["windows_forward"],
                grad_speedup=result["whole_row_grad"] / result["windows_grad"],
                whole_row_grad_temp_mib=temp_mib(fns["whole_row_grad"]),
                windows_grad_temp_mib=temp_mib(fns["windows_grad"]))
  return result


def _varlen(quick: bool) -> dict:
  """The variable-length comparison for t6_8M and t12_35M, printed and as results."""
  presets = ["t6_8M"] if quick else ["t6_8M", "t12_35M"]
  rows = [varlen_speed(p, 16 if quick else 48, 2 if quick else 5) for p in presets]
  print(f"\nforward over {rows[0]['sequences']} realistic lengths, {THREADS} threads, "
        f"load average {os.getloadavg()[0]:.1f}")
  common.print_table(rows, ["preset", "row_length", "port_token_efficiency",
                      "bucketed_token_efficiency", "transformers_token_efficiency",
                      "transformers_s", "port_s", "port_bucketed_s",
                      "speedup_vs_transformers", "bucketed_speedup_vs_transformers",
                      "speedup_vs_bucketed", "uniform_speedup_vs_transformers",
                      "max_abs_diff_vs_transformers"])
  ab = [packed_attention_ab(p, 16 if quick else 48, 2 if quick else 5) for p in presets]
  print("\none layer's attention on the packed rows, s: key windows vs the whole row")
  common.print_table(ab, ["preset", "rows", "whole_row_forward", "windows_forward",
                    "forward_speedup", "whole_row_grad", "windows_grad", "grad_speedup",
                    "whole_row_grad_temp_mib", "windows_grad_temp_mib"])
  return {"varlen": {r["preset"]: r for r in rows},
          "packed_attention": {r["preset"]: r for r in ab},
          "packing": {"token_efficiency": rows[-1]["port_token_efficiency"]},
          "threads": THREADS}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="fewer repeats / smaller cases")
  parser.add_argument("--json", help="write the results dict here")
  parser.add_argument("--batch", type=int, default=None)
  parser.add_argument("--threads", type=int, default=2,
                      help="CPU threads for torch; 1 also makes XLA single-threaded")
  parser.add_argument("--varlen", action="store_true",
                      help="only the variable-length comparison (48 realistic lengths)")
  args = parser.parse_args(argv)
  results = common.run_info()
  if not args.varlen:
    repeats = 3 if args.quick else 10
    batch = args.batch or 8
    variants = {"port_scan_auto": {}} if args.quick else {
        "port_scan_auto": {}, "port_unrolled_auto": {"scan_layers": False},
        "port_scan_exact": {"attention": "exact"}}
    presets = ["t6_8M"] if args.quick else ["t6_8M", "t12_35M"]
    speed = [cpu_speed(p, batch, 256, repeats, variants) for p in presets]
    results["cpu_forward"] = speed
    rows = [{"preset": s["preset"], "impl": "transformers",
             "tokens_per_s": s["transformers_tokens_per_s"]} for s in speed]
    for s in speed:
      for name in variants:
        rows.append({"preset": s["preset"], "impl": name, **s[name]})
    results["threads"] = THREADS
    print(f"forward, batch {batch} x 256, {jax.default_backend()} ({os.cpu_count()} cores, "
          f"{THREADS} threads, load average {os.getloadavg()[0]:.1f})")
    common.print_table(rows, ["preset", "impl", "tokens_per_s", "speedup_vs_transformers",
                              "first_call_s", "max_abs_diff_vs_transformers"])
  results.update(_varlen(args.quick))
  common.write_json(args.json, results, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
