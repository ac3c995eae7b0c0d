"""ESM-2 port benchmarks: CPU forward vs transformers, compiled memory, GPU throughput/MFU.

  python bench/bench_esm2.py [--quick] [--json PATH]            # CPU: speed + memory
  python bench/bench_esm2.py --gpu [--quick] [--json PATH]      # accelerator: bf16 t33_650M,
                                                                # packed rows per attention kind
  python bench/bench_esm2.py --varlen [--quick] [--json PATH]   # CPU: realistic lengths
  python bench/bench_esm2.py --splash-blocks [--json PATH]      # splash's visited blocks

CPU speed: forward tokens/s of the port (jit) and of transformers' PyTorch `EsmModel`
(default attention, inference_mode, torch.set_num_threads(2)) with the same random
weights, batch 8 x 256 tokens, no padding, measured side by side in one process in
interleaved rounds; the speedup is the median of per-round ratios. On a shared machine
PyTorch's OpenMP threads suffer more from oversubscription than XLA's: `--threads 1`
(both single-threaded) gives a comparison that is robust to load.
Variable lengths (--varlen): 48 sequences drawn from PDB-like lengths (lognormal, median
200, log-sd 0.7, cropped to 1,022), same random weights: transformers sorted by length in
batches of 8 padded to the batch's longest, the port on packed rows (several chains per
row, segment ids; the row length the input pipeline chooses for the preset, longer
chains one per row in 512/768/1024 buckets), one jitted call per row-length bucket.
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
Memory: `jit(loss+grad).lower().compile().memory_analysis()` of t33_650M fine-tuning
(MLM loss, L = 1024, batch 1) with and without per-layer remat; params come from
jax.eval_shape, nothing is allocated.
GPU: bf16 compute (fp32 params) t33_650M forward, L = 512. Model FLOPs per forward =
2 * P_matmul * tokens + 4 * L^2 * D * layers * batch, with P_matmul = layers * (4 D^2 +
2 D F) (q, k, v, out and the two FFN matrices; embeddings, norms, biases and softmax
not counted). MFU = FLOPs / time / peak dense bf16 FLOP/s of the device
(--peak-tflops, default from the device name: H100/H200 989).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

os.environ.setdefault("USE_TF", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _threads_from_argv(argv) -> int:
  """--threads N (read before jax is imported: XLA's CPU thread pool is fixed at start)."""
  pre = argparse.ArgumentParser(add_help=False)
  pre.add_argument("--threads", type=int, default=2)
  return pre.parse_known_args(argv)[0].threads


THREADS = _threads_from_argv(sys.argv[1:])
if THREADS == 1:  # single-threaded XLA CPU, for comparisons robust to a loaded machine
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
                             " intra_op_parallelism_threads=1")

from bihier_jax.common import host  # pylint: disable=wrong-import-position

host.tune_malloc()  # before JAX or TensorFlow start threads: see bihier_jax.common.host

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from bihier_jax.common import flops as flops_lib  # pylint: disable=wrong-import-position
from bihier_jax.common import residue_constants as rc  # pylint: disable=wrong-import-position
from bihier_jax.models import esm2  # pylint: disable=wrong-import-position


def _time(fn, repeats: int, warmup: int = 2) -> float:
  """Median seconds per call; fn must block until its result is ready."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def random_tokens(batch: int, length: int, seed: int = 0) -> np.ndarray:
  """<cls> random residues <eos>, no padding. int32 [batch, length]."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(rc.ESM_TOKEN["L"], rc.ESM_TOKEN["C"] + 1, (batch, length)).astype(np.int32)
  tokens[:, 0], tokens[:, -1] = rc.ESM_CLS, rc.ESM_EOS
  return tokens


def model_flops(cfg: esm2.ESM2Config, batch: int, length: int) -> float:
  """Forward FLOPs: 2 * matmul params * tokens + attention 4 L^2 D per layer and row."""
  d, f = cfg.embed_dim, cfg.ffn_dim
  p_matmul = cfg.num_layers * (4 * d * d + 2 * d * f)
  return 2.0 * p_matmul * batch * length + 4.0 * length * length * d * cfg.num_layers * batch


# --- CPU: port vs transformers ----------------------------------------------------------


def reference_and_params(preset: str):
  """(transformers EsmModel with random weights, eval mode; the same weights as the
  port's params) for `preset`, torch at THREADS threads."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from bihier_jax.models import esm2_checkpoint  # pylint: disable=import-outside-toplevel

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
  tokens = random_tokens(batch, length)
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
  torch_times, times = [], {name: [] for name in forwards}
  for _ in range(repeats):
    torch_times.append(_time(run_torch, 1, warmup=0))
    for name, fn in forwards.items():
      times[name].append(_time(fn, 1, warmup=0))
  torch_s = statistics.median(torch_times)
  result["transformers_tokens_per_s"] = batch * length / torch_s
  for name in forwards:
    result[name].update(
        tokens_per_s=batch * length / statistics.median(times[name]),
        speedup_vs_transformers=statistics.median(
            t / j for t, j in zip(torch_times, times[name])))
  return result


# --- CPU: variable lengths, packed rows vs padded batches ------------------------------


def realistic_lengths(n: int, seed: int = 0) -> np.ndarray:
  """PDB-like chain lengths: lognormal (median 200, log-sd 0.7), 30..1500, cropped to
  ESM-2's 1,022 residues (the distribution of bench_packing / bench_input_pipeline)."""
  lengths = np.clip(np.random.default_rng(seed).lognormal(np.log(200), 0.7, n), 30, 1500)
  return np.minimum(lengths.astype(int), 1022)


def _pack_rows(lengths: np.ndarray, row_length: int, buckets) -> list[tuple[int, list]]:
  """[(row length, rows)], each row a list of chain indices, first fit per length bucket:
  chains whose tokens (n + 2) fit `row_length` share its rows; longer ones go one per row
  into the smallest bucket above that holds them."""
  groups: dict[int, list] = {}
  for i in np.argsort(-lengths, kind="stable"):
    tokens = int(lengths[i]) + 2
    length = next(b for b in (row_length, *sorted(buckets)) if b >= tokens)
    rows = groups.setdefault(length, [])
    for row in rows:
      if sum(int(lengths[j]) + 2 for j in row) + tokens <= length:
        row.append(int(i))
        break
    else:
      rows.append([int(i)])
  return sorted(groups.items())


def packed_arrays(chains, groups):
  """[(tokens int32[R, L], segments int32[R, L] (-1 at padding), [(chain, row, column)])]
  per (row length, rows) group of `_pack_rows`; chains: token arrays with <cls>/<eos>."""
  out = []
  for length, rows in groups:
    tok = np.full((len(rows), length), rc.ESM_PAD, np.int32)
    seg = np.full((len(rows), length), -1, np.int32)
    where = []
    for r, row in enumerate(rows):
      col = 0
      for k, i in enumerate(row):
        tok[r, col:col + len(chains[i])] = chains[i]
        seg[r, col:col + len(chains[i])] = k
        where.append((i, r, col))
        col += len(chains[i])
    out.append((tok, seg, where))
  return out


def varlen_speed(preset: str, n: int, repeats: int, seed: int = 0) -> dict:
  """Forward over `n` sequences of realistic lengths (same random weights): the port on
  packed rows (one jitted call per row-length bucket) vs transformers sorted by length,
  batches of 8 padded to the batch's longest."""
  import torch  # pylint: disable=import-outside-toplevel
  from bihier_jax.data import input_pipeline  # pylint: disable=import-outside-toplevel

  cfg = esm2.config_from_preset(preset, mlm_head=False)
  reference, params = reference_and_params(preset)
  lengths = realistic_lengths(n, seed)
  rng = np.random.default_rng(seed + 1)
  chains = [random_tokens(1, int(k) + 2, seed=int(rng.integers(1 << 30)))[0]
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
  pool = realistic_lengths(4000, seed + 2)
  sizes = np.stack([pool, pool, np.ones_like(pool), 16 * pool], 1)
  row_length = input_pipeline.choose_row_length(sizes, cfg.embed_dim, cfg.ffn_dim,
                                                batch_size=8)
  groups = _pack_rows(lengths, row_length, (512, 768, 1024))
  model = esm2.ESM2(cfg)
  fwd = jax.jit(lambda p, t, s: model.apply({"params": p}, t, output_hidden_states=False,
                                            segments=s).last_hidden_state)
  packed = [(jnp.asarray(tok), jnp.asarray(seg), where)
            for tok, seg, where in packed_arrays(chains, groups)]

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
    rows = [[int(i)] for i in order if bucket_of[i] == length]
    for start in range(0, len(rows), 8):
      tok, _, where = packed_arrays(chains, [(length, rows[start:start + 8])])[0]
      bucketed.append((jnp.asarray(tok), None, where))
  assert sum(len(w) for _, _, w in bucketed) == n

  # Uniform rows, same weights, same rounds: how the two engines compare on this host
  # when neither pads (the varlen speed-up's ceiling is this times the slot ratio).
  uniform = random_tokens(8, 256, seed)
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
  times = {name: [] for name in runs}
  for _ in range(repeats):  # alternating rounds: each ratio compares runs seconds apart
    for name, fn in runs.items():
      times[name].append(_time(fn, 1, warmup=0))
  ratio = lambda a, b: statistics.median(x / y for x, y in zip(times[a], times[b]))
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


# --- compiled memory ---------------------------------------------------------------------


def finetune_memory(preset: str, length: int, batch: int, remat: bool) -> dict:
  cfg = esm2.config_from_preset(preset, remat=remat)
  model = esm2.ESM2(cfg)
  params = esm2.param_shapes(cfg)
  tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)

  def loss(p, t):
    logits = model.apply({"params": p}, t, return_mlm_logits=True,
                         output_hidden_states=False).logits
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), t[..., None], -1))

  start = time.perf_counter()
  compiled = jax.jit(jax.value_and_grad(loss)).lower(params, tokens).compile()
  compile_s = time.perf_counter() - start
  mem = compiled.memory_analysis()
  gib = 2.0 ** 30
  return {"preset": preset, "length": length, "batch": batch, "remat": remat,
          "compile_s": compile_s,
          "argument_gib": mem.argument_size_in_bytes / gib,
          "output_gib": mem.output_size_in_bytes / gib,
          "temp_gib": mem.temp_size_in_bytes / gib,
          "total_gib": (mem.argument_size_in_bytes + mem.output_size_in_bytes
                        + mem.temp_size_in_bytes - mem.alias_size_in_bytes) / gib}


# --- accelerator -------------------------------------------------------------------------


def gpu_throughput(preset: str, batch: int, length: int, repeats: int, peak_tflops: float | None,
                   attention: str) -> dict:
  device = jax.devices()[0]
  cfg = esm2.config_from_preset(preset, dtype=jnp.bfloat16, mlm_head=False, attention=attention)
  model = esm2.ESM2(cfg)
  params = jax.jit(lambda: esm2.init_params(cfg))()
  tokens = jnp.asarray(random_tokens(batch, length))
  fwd = jax.jit(lambda p, t: model.apply({"params": p}, t,
                                         output_hidden_states=False).last_hidden_state)
  start = time.perf_counter()
  fwd(params, tokens).block_until_ready()
  compile_s = time.perf_counter() - start
  seconds = _time(lambda: fwd(params, tokens).block_until_ready(), repeats)
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
  lengths = realistic_lengths(n)
  lengths = lengths[lengths + 2 <= 768]
  chains = [random_tokens(1, int(k) + 2, seed=i)[0] for i, k in enumerate(lengths)]
  tok, seg, _ = packed_arrays(chains, _pack_rows(lengths, 768, ()))[0]
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
      row["forward_ms"] = 1e3 * _time(lambda: fwd(params, tok, seg).block_until_ready(),
                                      repeats)
      row["grad_ms"] = 1e3 * _time(lambda: jax.block_until_ready(grad(params, tok, seg)),
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


# --- main --------------------------------------------------------------------------------


def _print_table(rows: list[dict], columns: list[str]) -> None:
  def fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)
  cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
  widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
  print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
  for row in cells:
    print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def packed_attention_ab(preset: str, n: int, repeats: int, seed: int = 0) -> dict:
  """One layer's attention on the packed rows `varlen_speed` builds (the rows of the
  chosen length, the preset's heads, random q/k/v): `attention.segment_attention`
  (key windows, forward and backward) vs `attention.masked_attention` with the
  same-chain mask over the whole row; forward and forward + backward, alternating
  rounds, and the compiled temporary memory of each forward + backward."""
  from bihier_jax.models import attention  # pylint: disable=import-outside-toplevel
  cfg = esm2.config_from_preset(preset, mlm_head=False)
  lengths = realistic_lengths(n, seed)
  chains = [np.zeros(int(n) + 2, np.int32) for n in lengths]  # only the layout counts
  _, ids, _ = packed_arrays(chains, _pack_rows(lengths, 768, (1024,)))[0]
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
  times = {name: [] for name in fns}
  for _ in range(repeats + 1):  # the first round compiles
    for name, fn in fns.items():
      times[name].append(_time(lambda fn=fn: jax.block_until_ready(fn(q, k, v, ids)), 1, 0))
  result = {name: statistics.median(t[1:]) for name, t in times.items()}
  temp_mib = lambda fn: fn.lower(q, k, v, ids).compile().memory_analysis(
      ).temp_size_in_bytes / 2**20
  result.update(preset=preset, rows=list(shape[:2]),
                forward_speedup=result["whole_row_forward"] / result["windows_forward"],
                grad_speedup=result["whole_row_grad"] / result["windows_grad"],
                whole_row_grad_temp_mib=temp_mib(fns["whole_row_grad"]),
                windows_grad_temp_mib=temp_mib(fns["windows_grad"]))
  return result


def _pipeline_rows(lengths: np.ndarray, row_length: int, batch_size: int,
                   seed: int = 0) -> dict[int, np.ndarray]:
  """Segment ids int32[R, L] (-1 at padding) of every row of every batch the input
  pipeline makes of single chains of `lengths` residues in a random stream order:
  `input_pipeline.bucket_budgets` (packed rows of `row_length`, longer chains in the
  1,024-token bucket; batch padding rows included) and `packing.plan_batches`, per
  row length."""
  from bihier_jax.data import input_pipeline, packing  # pylint: disable=import-outside-toplevel
  from configs import default  # pylint: disable=import-outside-toplevel
  config = default.get_config()
  config.data.pack_rows, config.data.row_length = True, row_length
  config.train.batch_size = batch_size
  edges = lengths * 16  # a residue graph's edges per node; only budgets' n_edge sees it
  sizes = np.stack([lengths, lengths, np.ones_like(lengths), edges], 1)
  budgets = input_pipeline.bucket_budgets(config, sizes)
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
  kernel each row gets (`esm2._splash_kernel`: its forward, dq and dk/dv kernels share
  it); no kernel runs. Also the same-chain (query, key) pairs of real tokens over L x L:
  what only elementwise skipping would leave."""
  from bihier_jax.models import attention  # pylint: disable=import-outside-toplevel
  out = {}
  for length, ids in _pipeline_rows(realistic_lengths(n, seed), row_length, batch_size,
                                    seed).items():
    rows = ids.shape[0]
    visits = attention.block_visits(jnp.asarray(ids), esm2.PALLAS_BLOCK)
    block_mask = jax.vmap(lambda v: esm2._splash_kernel(v, True).fwd_mask_info.block_mask)(  # pylint: disable=protected-access
        visits)
    visited = int((np.asarray(block_mask) > 0).sum())
    blocks = rows * (length // esm2.PALLAS_BLOCK) ** 2
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


def _varlen(quick: bool) -> dict:
  """The variable-length comparison for t6_8M and t12_35M, printed and as results."""
  presets = ["t6_8M"] if quick else ["t6_8M", "t12_35M"]
  rows = [varlen_speed(p, 16 if quick else 48, 2 if quick else 5) for p in presets]
  print(f"\nforward over {rows[0]['sequences']} realistic lengths, {THREADS} threads, "
        f"load average {os.getloadavg()[0]:.1f}")
  _print_table(rows, ["preset", "row_length", "port_token_efficiency",
                      "bucketed_token_efficiency", "transformers_token_efficiency",
                      "transformers_s", "port_s", "port_bucketed_s",
                      "speedup_vs_transformers", "bucketed_speedup_vs_transformers",
                      "speedup_vs_bucketed", "uniform_speedup_vs_transformers",
                      "max_abs_diff_vs_transformers"])
  ab = [packed_attention_ab(p, 16 if quick else 48, 2 if quick else 5) for p in presets]
  print("\none layer's attention on the packed rows, s: key windows vs the whole row")
  _print_table(ab, ["preset", "rows", "whole_row_forward", "windows_forward",
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
  parser.add_argument("--gpu", action="store_true", help="accelerator mode (bf16 t33_650M)")
  parser.add_argument("--batch", type=int, default=None)
  parser.add_argument("--peak-tflops", type=float, default=None)
  parser.add_argument("--threads", type=int, default=2,
                      help="CPU threads for torch; 1 also makes XLA single-threaded")
  parser.add_argument("--varlen", action="store_true",
                      help="only the variable-length comparison (48 realistic lengths)")
  parser.add_argument("--splash-blocks", action="store_true",
                      help="only the splash kernel's visited blocks on packed rows")
  args = parser.parse_args(argv)
  results: dict = {"backend": jax.default_backend(),
                   "devices": [d.device_kind for d in jax.devices()],
                   "jax": jax.__version__}

  if args.gpu:
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
    _print_table(results["gpu_packed_forward"],
                 ["device", "preset", "attention", "rows", "forward_ms", "grad_ms",
                  "forward_real_tokens_per_s", "max_abs_diff_vs_exact", "error"])
    _print_table(rows, ["device", "attention", "batch", "length", "step_ms", "tokens_per_s",
                        "achieved_tflops", "mfu", "error"])
  elif args.varlen:
    results.update(_varlen(args.quick))
  elif args.splash_blocks:
    n = 512 if args.quick else 4096
    counts = splash_blocks(n)
    results["splash_blocks"] = counts
    print(f"splash blocks computed on the pipeline's batches of {n} realistic chains "
          "(768-token packed rows, longer chains in 1,024-token rows; batch 32)")
    _print_table([{"row_length": k, **v} for k, v in counts.items()],
                 ["row_length", "rows", "empty_rows", "chains", "real_tokens", "blocks",
                  "visited_blocks", "visited_fraction", "same_chain_pair_fraction"])
  else:
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
    _print_table(rows, ["preset", "impl", "tokens_per_s", "speedup_vs_transformers",
                        "first_call_s", "max_abs_diff_vs_transformers"])
    memory = [finetune_memory("tiny" if args.quick else "t33_650M", 1024, 1, remat)
              for remat in (False, True)]
    results["finetune_memory"] = memory
    print("\nfine-tuning (MLM loss + grad) compiled memory, batch 1 x 1024")
    _print_table(memory, ["preset", "remat", "argument_gib", "output_gib", "temp_gib",
                          "total_gib", "compile_s"])
    results.update(_varlen(args.quick))

  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
