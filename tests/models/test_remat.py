"""What the ESM-2 layer scan keeps for the backward pass, read from the traced program
(`jax.ad_checkpoint.print_saved_residuals`), not from the policy's name.

Without remat every activation is kept and no weight is: the layer stack is kept by
reference (an argument of the step), never as a per-layer copy, whole or FSDP-gathered.
Tracing only, no compilation: a few seconds, plus one 2-device subprocess for FSDP.
"""

import contextlib
import io
import re

import jax
import jax.numpy as jnp
import pytest

from bihier_jax.models import esm2
from tests import multidevice

LAYERS, WIDTH, HEADS = 3, 32, 4
TOKENS = esm2.tokenize(["MKTAYIAKQR", "GGLLA"], 12)  # [B = 2, L = 12]


def saved_residuals(fn, *args) -> list[tuple[tuple[int, ...], str]]:
  """(shape, where it comes from) of every value `jax.grad(fn)` keeps for its backward
  pass, as `print_saved_residuals` reports them."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    jax.ad_checkpoint.print_saved_residuals(fn, *args)
  rows = []
  for line in out.getvalue().splitlines():
    dims, source = re.match(r"\w+\[([\d,]*)\] (.*)", line).groups()
    rows.append((tuple(int(d) for d in dims.split(",") if d), source))
  return rows


def weight_copies(rows, matrices) -> list:
  """Residuals that are copies of layer weight matrices: not the parameters themselves
  ('from the argument'), with a weight matrix's shape as their last two dimensions
  (scanned layers stack copies on a leading axis)."""
  return [(shape, source) for shape, source in rows
          if not source.startswith("from the argument") and shape[-2:] in matrices]


def _matrices(cfg: esm2.ESM2Config) -> set[tuple[int, int]]:
  d, f = cfg.embed_dim, cfg.ffn_dim
  return {(d, 3 * d), (d, d), (d, f), (f, d), *(
      shape for d_in, d_out in cfg.lora_shapes().values()
      for shape in ((d_in, cfg.lora_rank), (cfg.lora_rank, d_out)))}


@pytest.mark.parametrize("dtype,lora_rank,scan", [("float32", 0, True),
                                                  ("bfloat16", 4, True),
                                                  ("float32", 4, False)])
def test_layers_keep_activations_but_no_weight_copies(dtype, lora_rank, scan):
  cfg = esm2.ESM2Config(num_layers=LAYERS, embed_dim=WIDTH, num_heads=HEADS,
                        mlm_head=False, dtype=dtype, scan_layers=scan,
                        lora_rank=lora_rank, lora_targets=("q", "v", "fc1"))
  params = esm2.param_shapes(cfg)  # shapes suffice: the program is traced, not run
  model = esm2.ESM2(cfg)

  def loss(p):
    out = model.apply({"params": p}, TOKENS, output_hidden_states=False)
    return out.last_hidden_state.astype(jnp.float32).sum()

  rows = saved_residuals(loss, params)
  assert not weight_copies(rows, _matrices(cfg)), weight_copies(rows, _matrices(cfg))
  # Activations are still kept, e.g. each layer's FFN hidden [B, L, F] (stacked over
  # the scanned layers): this is no full remat.
  ffn_hidden = (2, 12, cfg.ffn_dim)
  assert any(shape[-3:] == ffn_hidden for shape, _ in rows), rows


def test_fsdp_layers_keep_no_gathered_weights():
  multidevice.run("remat_fsdp", timeout=120)


def _apply(config, flags):
  """`--config.key=value` flags (as a launcher writes them) applied to `config`."""
  for flag in flags:
    path, value = flag[len("--config."):].split("=", 1)
    *groups, key = path.split(".")
    node = config
    for group in groups:
      node = node[group]
    old = node[key]
    node[key] = (value == "True") if isinstance(old, bool) else type(old)(value)
  return config


def test_fsdp_needs_remat_and_both_launchers_set_it():
  import importlib  # pylint: disable=g-import-not-at-top
  from bihier_jax import config_check  # pylint: disable=g-import-not-at-top
  from data_pipelines import download  # pylint: disable=g-import-not-at-top
  from launch import slurm_gpu, tpu_vm  # pylint: disable=g-import-not-at-top
  slurm_flags = [a for a in slurm_gpu.train_argv(slurm_gpu.SlurmJob("c.py", "/w", fsdp=4))
                 if a.startswith("--config.") and "multi_host" not in a]
  for task in (*download.TASKS, "demo"):  # every task config as it ships
    get_config = importlib.import_module(f"configs.{task}").get_config
    config = _apply(get_config(), ["--config.train.fsdp=4"])
    with pytest.raises(config_check.ConfigError, match=(
        r"^train.fsdp=4 needs model.esm.remat=True .* add --config.model.esm.remat=True$")):
      config_check.check(config, needs_data=False)
    for flags in (tpu_vm.fsdp_flags(4), slurm_flags):
      config_check.check(_apply(get_config(), flags), needs_data=False)
