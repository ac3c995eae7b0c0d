"""Models: ESM-2 port, ProNet-style GNN, fusion, task heads, and the assembled model;
`DTYPES`, the allowed `model.dtype` values. Model docs: docs/model.md.

    model = build_model(config)                 # config: full ml_collections config
    params = init_params(model, batch, rng)     # random init (ESM too)
    params = load_pretrained_esm(params, path)  # if config.model.esm.checkpoint
    out = model.apply({"params": params}, batch, deterministic=False,
                      rngs={"dropout": key})    # -> bihier.ModelOutput
    loss, aux = heads.loss(config.task, out.logits, batch)
"""

from __future__ import annotations

import jax

# model.dtype: compute dtype of matmuls and activations (parameters stay float32).
DTYPES = ("float32", "bfloat16")

# Submodules are imported inside the functions, so `import bihier_jax.models.esm2` does
# not pull in the whole model stack.


def build_model(config):
  """`bihier.BiHierModel` described by `config.model` for `config.task` (any kind)."""
  from bihier_jax.models import bihier  # pylint: disable=import-outside-toplevel
  return bihier.BiHierModel(bihier.BiHierConfig.from_config(config))


def init_params(model, batch, rng) -> dict:
  """Random float32 parameters for `model` from one example batch (shapes only)."""
  variables = jax.jit(lambda r, b: model.init(r, b, deterministic=True))(rng, batch)
  return variables["params"]


def load_pretrained_esm(params: dict, path: str) -> dict:
  """`params` with the 'esm' subtree replaced by a converted ESM-2 checkpoint.

  The checkpoint must match the configured preset's shapes (the command-line tools
  set model.esm.preset from the checkpoint); its MLM head (unused here) is dropped.

  Raises:
    ValueError: no 'esm' subtree, or shapes/names differ (names the first mismatch).
  """
  from bihier_jax.models import esm2  # pylint: disable=import-outside-toplevel
  if "esm" not in params:
    raise ValueError("model has no 'esm' parameters (model.kind='gnn_only')")
  pretrained, loaded = esm2.from_pretrained(path)
  fix = (f"the checkpoint is {esm2.preset_name(pretrained.config)}: set "
         f"model.esm.preset={esm2.preset_name(pretrained.config)} (python -m "
         "bihier_jax.train reads it from the checkpoint)")
  loaded = {k: v for k, v in loaded.items() if k in params["esm"]}
  if esm2.LORA_PARAM in params["esm"]:  # fresh adapters on the pretrained weights
    loaded[esm2.LORA_PARAM] = params["esm"][esm2.LORA_PARAM]
  want = jax.tree_util.tree_structure(params["esm"])
  got = jax.tree_util.tree_structure(loaded)
  if want != got:
    raise ValueError(f"ESM checkpoint {path}: parameter names differ from the model's "
                     f"({got} vs {want}); {fix}")
  for (key, a), b in zip(jax.tree_util.tree_leaves_with_path(params["esm"]),
                         jax.tree_util.tree_leaves(loaded)):
    if a.shape != b.shape:
      raise ValueError(f"ESM checkpoint {path}: {jax.tree_util.keystr(key)} has shape "
                       f"{b.shape}, the configured preset needs {a.shape}; {fix}")
  return {**params, "esm": loaded}


__all__ = ["DTYPES", "build_model", "init_params", "load_pretrained_esm"]
