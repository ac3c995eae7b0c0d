"""Loading ESM-2 weights into the Flax port: `load_pretrained(path)` detects the source
(`detect_format`): a Hugging Face directory (config.json + model.safetensors, sharded
safetensors or pytorch_model.bin), a fair-esm `.pt` file, or a directory `save` wrote
(config.json with "format": "bihier_jax.esm2" + Orbax `params/`); local paths or URLs,
read through `bihier_jax.common.storage`. `read_architecture` / `preset_of` read the
architecture alone. No pickle is executed (`safetensors.numpy`,
`torch.load(weights_only=True)`); missing, unexpected or mis-shaped tensors raise
`CheckpointMismatchError` naming each. Torch Linear weights (out, in) are transposed;
query/key/value are concatenated into the fused `qkv_proj` (columns q | k | v). Usage:
docs/pretrained.md.
"""

from __future__ import annotations

import argparse
import io
import os
import re
from typing import Any, Callable

import numpy as np

from bihier_jax.common import storage
from bihier_jax.common import residue_constants as rc
from bihier_jax.models.esm2.config import PRESETS, ESM2Config, preset_name
from bihier_jax.models.esm2.model import param_shapes

FORMAT = "bihier_jax.esm2"
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"

# Execution options a caller may change when loading (the architecture comes from the file).
EXECUTION_OPTIONS = ("dtype", "f32_residual", "remat", "scan_layers", "attention",
                     "mlm_head")


class CheckpointMismatchError(ValueError):
  """A checkpoint does not match the expected ESM-2 architecture."""


# --- reading tensors -------------------------------------------------------------------


def _torch_load(path: str, mmap: bool = False) -> Any:
  """torch.load(weights_only=True) of a local file or URL; `mmap` maps a local file
  instead of reading it (enough for shapes)."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f"{path}: reading torch files needs torch: pip install -e "
                      "'.[convert]' (or convert the file where torch is installed)") from e
  local = storage.local_path(path)
  source = local if local is not None else io.BytesIO(storage.read_bytes(path))
  with torch.serialization.safe_globals([argparse.Namespace]):
    try:
      if mmap and local is not None:
        try:
          return torch.load(local, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (non-zip) format cannot be mapped
          pass
      return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:  # the unpickler names the class it refused
      raise ValueError(f"{path}: not loadable with torch.load(weights_only=True): {e}") from e


def _to_numpy(tensor) -> np.ndarray:
  if isinstance(tensor, np.ndarray):
    return tensor.astype(np.float32, copy=False)
  import torch  # pylint: disable=import-outside-toplevel
  return tensor.detach().to(torch.float32).cpu().numpy()


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors import numpy as st  # pylint: disable=import-outside-toplevel
  local = storage.local_path(path)
  return st.load_file(local) if local is not None else st.load(storage.read_bytes(path))


def read_hf_tensors(directory: str) -> dict[str, np.ndarray]:
  """Every tensor of a Hugging Face checkpoint directory, float32 numpy."""
  single = storage.join(directory, "model.safetensors")
  index = storage.join(directory, "model.safetensors.index.json")
  binary = storage.join(directory, "pytorch_model.bin")
  if storage.exists(single):
    tensors = _read_safetensors(single)
  elif storage.exists(index):
    shards = sorted(set(storage.read_json(index)["weight_map"].values()))
    tensors = {}
    for shard in shards:
      tensors.update(_read_safetensors(storage.join(directory, shard)))
  elif storage.exists(binary):
    tensors = _torch_load(binary)
  elif storage.exists(binary + ".index.json"):  # sharded pytorch_model-0000i-of-0000n.bin
    shards = sorted(set(storage.read_json(binary + ".index.json")["weight_map"].values()))
    tensors = {}
    for shard in shards:
      tensors.update(_torch_load(storage.join(directory, shard)))
  else:
    raise FileNotFoundError(
        f"{directory}: no model.safetensors, model.safetensors.index.json, "
        "pytorch_model.bin or pytorch_model.bin.index.json")
  return {k: _to_numpy(v) for k, v in tensors.items()}


# --- name mapping ----------------------------------------------------------------------

# Per layer: our group -> (kind, torch module names; several are concatenated on `out`).
_HF_LAYER = {
    "self_attn_layer_norm": ("norm", ["encoder.layer.{i}.attention.LayerNorm"]),
    "qkv_proj": ("linear", ["encoder.layer.{i}.attention.self.query",
                            "encoder.layer.{i}.attention.self.key",
                            "encoder.layer.{i}.attention.self.value"]),
    "out_proj": ("linear", ["encoder.layer.{i}.attention.output.dense"]),
    "final_layer_norm": ("norm", ["encoder.layer.{i}.LayerNorm"]),
    "fc1": ("linear", ["encoder.layer.{i}.intermediate.dense"]),
    "fc2": ("linear", ["encoder.layer.{i}.output.dense"]),
}
_HF_TOP = {
    "embedding": "embeddings.word_embeddings.weight",
    "emb_layer_norm_after": "encoder.emb_layer_norm_after",
    "lm_dense": "lm_head.dense", "lm_layer_norm": "lm_head.layer_norm",
    "lm_bias": "lm_head.bias", "lm_tied": "lm_head.decoder.weight",
}
_HF_IGNORED = re.compile(r"(.*rotary_embeddings\.inv_freq|pooler\..*|contact_head\..*"
                         r"|embeddings\.position_ids)$")

_FAIR_LAYER = {
    "self_attn_layer_norm": ("norm", ["layers.{i}.self_attn_layer_norm"]),
    "qkv_proj": ("linear", ["layers.{i}.self_attn.q_proj", "layers.{i}.self_attn.k_proj",
                            "layers.{i}.self_attn.v_proj"]),
    "out_proj": ("linear", ["layers.{i}.self_attn.out_proj"]),
    "final_layer_norm": ("norm", ["layers.{i}.final_layer_norm"]),
    "fc1": ("linear", ["layers.{i}.fc1"]),
    "fc2": ("linear", ["layers.{i}.fc2"]),
}
_FAIR_TOP = {
    "embedding": "embed_tokens.weight",
    "emb_layer_norm_after": "emb_layer_norm_after",
    "lm_dense": "lm_head.dense", "lm_layer_norm": "lm_head.layer_norm",
    "lm_bias": "lm_head.bias", "lm_tied": "lm_head.weight",
}
_FAIR_IGNORED = re.compile(r"(.*rot_emb\.inv_freq|contact_head\..*)$")


def _linear_shapes(cfg: ESM2Config) -> dict[str, list[tuple[int, int]]]:
  """(out, in) of each torch Linear making up a group."""
  d, f = cfg.embed_dim, cfg.ffn_dim
  return {"qkv_proj": [(d, d)] * 3, "out_proj": [(d, d)], "fc1": [(f, d)], "fc2": [(d, f)]}


class _Reader:
  """Takes tensors by name, checking shapes; collects every problem before raising."""

  def __init__(self, tensors: dict[str, np.ndarray], source: str):
    self.tensors = tensors
    self.source = source
    self.used: set[str] = set()
    self.missing: list[str] = []
    self.mismatched: list[str] = []

  def take(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    self.used.add(name)
    if name not in self.tensors:
      self.missing.append(f"{name} {tuple(shape)}")
      return np.zeros(shape, np.float32)
    value = self.tensors[name]
    if tuple(value.shape) != tuple(shape):
      self.mismatched.append(f"{name}: checkpoint {tuple(value.shape)}, expected {tuple(shape)}")
      return np.zeros(shape, np.float32)
    return value

  def check(self, ignored: re.Pattern):
    unexpected = [f"{k} {tuple(v.shape)}" for k, v in sorted(self.tensors.items())
                  if k not in self.used and not ignored.match(k)]
    if self.missing or self.mismatched or unexpected:
      lines = [f"{self.source}: checkpoint does not match the ESM-2 architecture"]
      for title, items in (("missing", self.missing), ("shape mismatch", self.mismatched),
                           ("unexpected", unexpected)):
        if items:
          lines.append(f"  {title} ({len(items)}):")
          lines.extend(f"    {item}" for item in items)
      raise CheckpointMismatchError("\n".join(lines))


def params_from_torch(tensors: dict[str, np.ndarray], cfg: ESM2Config, layer_spec,
                      top: dict[str, str], ignored: re.Pattern, source: str) -> dict:
  """Our parameter tree (float32 numpy) from a torch state dict with the given naming."""
  reader = _Reader(tensors, source)
  d, v = cfg.embed_dim, cfg.vocab_size
  linear_shapes = _linear_shapes(cfg)

  def norm(name, size):
    return {"scale": reader.take(f"{name}.weight", (size,)),
            "bias": reader.take(f"{name}.bias", (size,))}

  def linear(names, shapes):
    kernels = [reader.take(f"{n}.weight", s).T for n, s in zip(names, shapes)]
    biases = [reader.take(f"{n}.bias", (s[0],)) for n, s in zip(names, shapes)]
    return {"kernel": np.concatenate(kernels, axis=1), "bias": np.concatenate(biases)}

  per_layer = []
  for i in range(cfg.num_layers):
    layer = {}
    for group, (kind, templates) in layer_spec.items():
      names = [t.format(i=i) for t in templates]
      layer[group] = norm(names[0], d) if kind == "norm" else linear(names, linear_shapes[group])
    per_layer.append(layer)
  layers = {g: {k: np.stack([layer[g][k] for layer in per_layer]) for k in per_layer[0][g]}
            for g in per_layer[0]}

  embedding = reader.take(top["embedding"], (v, d))
  params = {"embed_tokens": {"embedding": embedding}, "layers": layers,
            "emb_layer_norm_after": norm(top["emb_layer_norm_after"], d)}
  if cfg.mlm_head:
    params["lm_head"] = {"dense": linear([top["lm_dense"]], [(d, d)]),
                         "layer_norm": norm(top["lm_layer_norm"], d),
                         "bias": reader.take(top["lm_bias"], (v,))}
    if top["lm_tied"] in tensors:  # tied to the embedding: must be the same matrix
      tied = reader.take(top["lm_tied"], (v, d))
      if tied.shape == embedding.shape and not np.array_equal(tied, embedding):
        reader.mismatched.append(f"{top['lm_tied']}: differs from {top['embedding']} "
                                 "(the port ties the MLM decoder to the embedding)")
  else:  # a caller dropping the head: its tensors are expected, not errors
    reader.used.update(k for k in tensors if k.startswith("lm_head."))
  reader.check(ignored)
  return params


def _has_lm_head(tensors: dict[str, np.ndarray]) -> bool:
  return any(k.startswith("lm_head.") for k in tensors)


# --- Hugging Face ----------------------------------------------------------------------


def config_from_hf(hf: dict[str, Any], source: str, **overrides) -> ESM2Config:
  """ESM2Config from a transformers EsmConfig dict; refuses non-ESM-2 variants."""
  problems = []
  if hf.get("position_embedding_type", "absolute") != "rotary":
    problems.append(f"position_embedding_type={hf.get('position_embedding_type')!r} "
                    "(need 'rotary')")
  if hf.get("emb_layer_norm_before"):
    problems.append("emb_layer_norm_before=True (ESM-1b style; ESM-2 has none)")
  if hf.get("is_folding_model"):
    problems.append("is_folding_model=True (ESMFold)")
  if hf.get("vocab_size", 33) != len(rc.ESM_VOCAB):
    problems.append(f"vocab_size={hf.get('vocab_size')} (need {len(rc.ESM_VOCAB)})")
  if hf.get("mask_token_id", rc.ESM_MASK) != rc.ESM_MASK:
    problems.append(f"mask_token_id={hf.get('mask_token_id')} (need {rc.ESM_MASK})")
  if hf.get("pad_token_id", rc.ESM_PAD) != rc.ESM_PAD:
    problems.append(f"pad_token_id={hf.get('pad_token_id')} (need {rc.ESM_PAD})")
  if hf.get("hidden_act", "gelu") != "gelu":
    problems.append(f"hidden_act={hf.get('hidden_act')!r} (need 'gelu')")
  if problems:
    raise CheckpointMismatchError(f"{source}: not an ESM-2 config: " + "; ".join(problems))
  fields = dict(num_layers=hf["num_hidden_layers"], embed_dim=hf["hidden_size"],
                num_heads=hf["num_attention_heads"], ffn_dim=hf["intermediate_size"],
                token_dropout=bool(hf.get("token_dropout", True)),
                layer_norm_eps=float(hf.get("layer_norm_eps", 1e-5)))
  fields.update(overrides)
  return ESM2Config(**fields)


def load_hf(directory: str, **overrides) -> tuple[ESM2Config, dict]:
  """(config, params) from a Hugging Face EsmModel / EsmForMaskedLM directory."""
  hf = storage.read_json(storage.join(directory, CONFIG_FILE))
  tensors = read_hf_tensors(directory)
  if any(k.startswith("esm.") for k in tensors):  # EsmForMaskedLM prefixes the encoder
    tensors = {k[len("esm."):] if k.startswith("esm.") else k: v for k, v in tensors.items()}
  overrides.setdefault("mlm_head", _has_lm_head(tensors))
  cfg = config_from_hf(hf, directory, **overrides)
  return cfg, params_from_torch(tensors, cfg, _HF_LAYER, _HF_TOP, _HF_IGNORED, directory)


# --- fair-esm --------------------------------------------------------------------------


def _fair_esm_state_dict(obj: Any, source: str) -> tuple[dict[str, Any], Any]:
  """(state dict with release prefixes removed, cfg or None) of a torch.load result."""
  if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
    state, cfg = obj["model"], obj.get("cfg")
  elif isinstance(obj, dict):
    state, cfg = obj, None
  else:
    raise ValueError(f"{source}: expected a dict from torch.load, got {type(obj).__name__}")
  # Released files name the encoder `encoder.sentence_encoder.` (fair-esm's upgrade rule).
  prefix = re.compile(r"^(encoder\.sentence_encoder\.|encoder\.)")
  return {prefix.sub("", k): v for k, v in state.items()}, cfg


def _cfg_get(cfg: Any, name: str):
  """A field of fair-esm's cfg['model'] (argparse.Namespace or dict), or None."""
  if cfg is None:
    return None
  model = cfg.get("model", cfg) if isinstance(cfg, dict) else getattr(cfg, "model", cfg)
  if isinstance(model, dict):
    return model.get(name)
  return getattr(model, name, None)


def config_from_fair_esm(tensors: dict[str, np.ndarray], cfg_obj: Any, source: str,
                         **overrides) -> ESM2Config:
  """Architecture from the file's cfg, else from tensor shapes and the released sizes."""
  if "embed_tokens.weight" not in tensors:
    raise CheckpointMismatchError(f"{source}: no embed_tokens.weight; not a fair-esm ESM-2 file")
  embed_dim = int(tensors["embed_tokens.weight"].shape[1])
  num_layers = 1 + max((int(m.group(1)) for k in tensors
                        if (m := re.match(r"layers\.(\d+)\.", k))), default=-1)
  heads = _cfg_get(cfg_obj, "encoder_attention_heads")
  if heads is None:
    known = {(c.num_layers, c.embed_dim): c.num_heads for c in PRESETS.values()}
    heads = overrides.pop("num_heads", None) or known.get((num_layers, embed_dim))
  if heads is None:
    raise CheckpointMismatchError(
        f"{source}: {num_layers} layers x {embed_dim} is not a released ESM-2 size and the "
        "file has no cfg; pass num_heads=")
  token_dropout = _cfg_get(cfg_obj, "token_dropout")
  fc1 = tensors.get("layers.0.fc1.weight")
  fields = dict(num_layers=num_layers, embed_dim=embed_dim, num_heads=int(heads),
                ffn_dim=int(fc1.shape[0]) if fc1 is not None else None,
                token_dropout=True if token_dropout is None else bool(token_dropout))
  fields.update(overrides)
  return ESM2Config(**fields)


def load_fair_esm(path: str, **overrides) -> tuple[ESM2Config, dict]:
  """(config, params) from a fair-esm `.pt` file (release file or a bare state dict)."""
  state, cfg_obj = _fair_esm_state_dict(_torch_load(path), path)
  tensors = {k: _to_numpy(v) for k, v in state.items()}
  overrides.setdefault("mlm_head", _has_lm_head(tensors))
  cfg = config_from_fair_esm(tensors, cfg_obj, path, **overrides)
  return cfg, params_from_torch(tensors, cfg, _FAIR_LAYER, _FAIR_TOP, _FAIR_IGNORED, path)


# --- our format: Orbax params + config.json ---------------------------------------------


def save(directory: str, cfg: ESM2Config, params: dict, source: str = "",
         overwrite: bool = False) -> None:
  """Writes `config.json` and an Orbax checkpoint of float32 params under `params/`
  (`directory` may be a gs:// URL)."""
  import json  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  directory = storage.absolute(directory)
  params_dir = storage.join(directory, PARAMS_DIR)
  if storage.exists(params_dir) and not overwrite:
    raise FileExistsError(f"{params_dir} exists; pass overwrite=True (--overwrite) to replace it")
  if not storage.is_url(directory):
    os.makedirs(directory, exist_ok=True)
  arrays = _as_float32_numpy(params)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(storage.orbax_path(params_dir), arrays, force=overwrite)
  checkpointer.wait_until_finished()
  checkpointer.close()
  with storage.open(storage.join(directory, CONFIG_FILE), "w") as f:
    f.write(json.dumps({"format": FORMAT, "version": 1, "source": source,
                        "config": cfg.to_dict()}, indent=2))


def _as_float32_numpy(params: dict) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  return jax.tree.map(lambda a: np.asarray(a, np.float32), params)


def load_converted(directory: str, **overrides) -> tuple[ESM2Config, dict]:
  """(config, params) from a directory written by `save` / `convert_esm`."""
  import jax  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  directory = storage.absolute(directory)
  meta = storage.read_json(storage.join(directory, CONFIG_FILE))
  fields = dict(meta["config"])
  drop_head = overrides.get("mlm_head") is False and fields.get("mlm_head")
  fields.update({k: v for k, v in overrides.items() if k != "mlm_head" or not drop_head})
  stored = ESM2Config.from_dict(fields)
  target = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), param_shapes(stored))
  checkpointer = ocp.StandardCheckpointer()
  try:
    params = checkpointer.restore(storage.orbax_path(storage.join(directory, PARAMS_DIR)),
                                  target)
  except Exception as e:
    raise CheckpointMismatchError(f"{directory}: restoring {PARAMS_DIR}/ failed: {e}") from e
  finally:
    checkpointer.close()
  if drop_head:
    params = {k: v for k, v in params.items() if k != "lm_head"}
    stored = ESM2Config.from_dict({**fields, "mlm_head": False})
  return stored, params


# --- dispatch --------------------------------------------------------------------------


def detect_format(path: str) -> str:
  """'converted', 'hf' or 'fair_esm'."""
  if storage.isdir(path):
    config_path = storage.join(path, CONFIG_FILE)
    if not storage.exists(config_path):
      raise FileNotFoundError(f"{path}: directory without {CONFIG_FILE}")
    meta = storage.read_json(config_path)
    return "converted" if meta.get("format") == FORMAT else "hf"
  if storage.isfile(path):
    return "fair_esm"
  raise FileNotFoundError(f"{path}: no such file or directory")


def read_architecture(path: str) -> ESM2Config:
  """The architecture of a checkpoint without reading its weights: config.json of a
  Hugging Face or converted directory, the tensor shapes (memory-mapped) and `cfg` of
  a fair-esm `.pt`.

  Raises:
    FileNotFoundError: no such checkpoint; CheckpointMismatchError: not ESM-2.
  """
  fmt = detect_format(path)
  if fmt == "converted":
    fields = storage.read_json(storage.join(path, CONFIG_FILE))["config"]
    return ESM2Config.from_dict(fields)
  if fmt == "hf":
    return config_from_hf(storage.read_json(storage.join(path, CONFIG_FILE)), path)
  state, cfg_obj = _fair_esm_state_dict(_torch_load(path, mmap=True), path)
  return config_from_fair_esm(state, cfg_obj, path)


def preset_of(path: str) -> str:
  """`model.esm.preset` of a checkpoint: a released preset's name (t33_650M, ...) or,
  for another size, its "L<layers>_D<width>_H<heads>_F<ffn>" architecture."""
  return preset_name(read_architecture(path))


def describe(cfg: ESM2Config) -> str:
  """'33 layers x 1280 wide, 20 heads' (for messages)."""
  return f"{cfg.num_layers} layers x {cfg.embed_dim} wide, {cfg.num_heads} heads"


_LOADERS: dict[str, Callable[..., tuple[ESM2Config, dict]]] = {
    "converted": load_converted, "hf": load_hf, "fair_esm": load_fair_esm}


def load_pretrained(path: str, **overrides) -> tuple[ESM2Config, dict]:
  """(config, float32 params) from any supported source; overrides: EXECUTION_OPTIONS."""
  bad = set(overrides) - set(EXECUTION_OPTIONS) - {"num_heads"}
  if bad:
    raise ValueError(f"only execution options {EXECUTION_OPTIONS} can be overridden, "
                     f"got {sorted(bad)}")
  fmt = detect_format(path)
  cfg, params = _LOADERS[fmt](path, **overrides)
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  return cfg, jax.tree.map(jnp.asarray, params)
