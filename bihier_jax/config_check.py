"""Config validation before anything expensive starts: one line per mistake.

`check(config)` raises `ConfigError` naming the field, the value and the allowed values
(or the closest valid name). The command-line entry points (`bihier_jax.cli`) call it
after the command line is parsed and before JAX or TensorFlow start, demo data is built
or the workdir is created. Allowed values come from the modules that use them; importing
those modules loads JAX but initialises no backend (no device is touched here).
"""

from __future__ import annotations

import difflib
import json
import os
from typing import Any

import ml_collections

# Values of fields whose code lives in heavy modules (Orbax): those modules import these.
SELECT_MODES = ("max", "min")  # task.select_mode (training.checkpointing)
ON_CORRUPT_CHECKPOINT = ("fallback", "fail")  # train.on_corrupt_checkpoint (train_lib)

# Not exported as constants by the modules that read them yet.
_SCHEDULES = ("cosine", "step", "constant")  # training.optim.learning_rate_schedule
_CROPS = ("random", "first")  # data.input_pipeline: anything but 'random' crops 'first'
_POOLINGS = ("sum", "mean")  # models.heads
_DTYPES = ("float32", "bfloat16")  # model.dtype as documented in configs/default.py


class ConfigError(ValueError):
  """A config mistake; the message is one line that says what to change."""


def field_paths(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """Every leaf field as a dotted path ('train.batch_size', ...)."""
  paths = []
  for key, value in config.items():
    path = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      paths.extend(field_paths(value, path + "."))
    else:
      paths.append(path)
  return paths


def closest(name: str, candidates) -> str | None:
  """The candidate most like `name` (difflib), or None if none is close."""
  found = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
  return found[0] if found else None


def unknown_field(path: str, config: ml_collections.ConfigDict, prefix: str = ""
                  ) -> str | None:
  """None if `path` names a field of `config`, else a message with the closest field
  (field names shown with `prefix`, e.g. '--config.')."""
  node: Any = config
  keys = path.split(".")
  for i, key in enumerate(keys):
    if not isinstance(node, ml_collections.ConfigDict):
      return (f"{prefix}{'.'.join(keys[:i])} is a value, not a group of fields: there is "
              f"no {prefix}{path}")
    if key not in node:
      guess = closest(path, field_paths(config)) or closest(path, _groups(config))
      hint = f" (did you mean {prefix}{guess}?)" if guess else ""
      return f"unknown config field {prefix}{path}{hint}"
    node = node[key]
  return None


def _groups(config, prefix=""):
  out = []
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.append(f"{prefix}{key}")
      out.extend(_groups(value, f"{prefix}{key}."))
  return out


def _get(config, path: str, default=None):
  node = config
  for key in path.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or key not in node:
      return default
    node = node[key]
  return node


def _one_of(config, path: str, allowed) -> None:
  _one_of_value(path, _get(config, path), allowed)


def _one_of_value(path: str, value, allowed) -> None:
  if value is None or value in allowed:
    return
  guess = closest(str(value), [str(a) for a in allowed])
  hint = f" (did you mean {guess!r}?)" if guess else ""
  raise ConfigError(f"{path}={value!r} is not one of {' | '.join(map(str, allowed))}"
                    f"{hint}")


def _whole(config, path: str, low: int, high: int | None = None) -> None:
  value = _get(config, path)
  if value is None:
    return
  if isinstance(value, bool) or not isinstance(value, int):
    raise ConfigError(f"{path}={value!r} must be a whole number")
  if value < low or (high is not None and value > high):
    bound = f"in {low}..{high}" if high is not None else f">= {low}"
    raise ConfigError(f"{path}={value} must be {bound}")


def _non_negative(config, path: str) -> None:
  value = _get(config, path)
  if value is None:
    return
  if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
    raise ConfigError(f"{path}={value!r} must be a number >= 0 (0 = unused)")


def check_data_dir(config: ml_collections.ConfigDict) -> None:
  """data.dir holds prepared records (the demo task builds its own on first use)."""
  task = _get(config, "task.name", "")
  directory = str(_get(config, "data.dir", "") or "")
  if task == "demo":
    if not directory:
      raise ConfigError("data.dir is empty: set --config.data.dir to a folder for the demo "
                        "records (built there on first use)")
    return
  command = f"`python -m data_pipelines.preprocess {task or '<task>'} --out DIR`"
  if not directory:
    raise ConfigError(f"data.dir is not set: set --config.data.dir to the folder written "
                      f"by {command}")
  path = os.path.expanduser(directory)
  if not os.path.isfile(os.path.join(path, "metadata.json")):
    what = "does not exist" if not os.path.exists(path) else "has no metadata.json"
    raise ConfigError(f"data.dir={directory} {what}: set --config.data.dir to the folder "
                      f"written by {command}")


def check_values(config: ml_collections.ConfigDict) -> None:
  """Allowed values, types and ranges of the fields that would otherwise fail late."""
  # pylint: disable=g-import-not-at-top
  from bihier_jax.models import bihier
  from bihier_jax.models import esm2
  from bihier_jax.models import fusion
  from bihier_jax.models import heads
  from bihier_jax.models import pronet
  from bihier_jax.models import trainable
  from bihier_jax.training import metrics
  # pylint: enable=g-import-not-at-top
  _one_of(config, "task.level", heads.LEVELS)
  from bihier_jax.data import featurize  # pylint: disable=g-import-not-at-top
  _one_of(config, "data.incomplete_backbone", featurize.INCOMPLETE_BACKBONE_POLICIES)
  names = _get(config, "task.class_names")
  columns = _get(config, "task.num_classes") if _get(config, "task.loss") == (
      "softmax_ce") else 1
  if names and columns is not None and len(names) != int(columns):
    raise ConfigError(f"task.class_names has {len(names)} name(s) for {columns} "
                      "prediction column(s): give one per class, or () for class_0..")
  _one_of(config, "task.loss", heads.LOSSES)
  _one_of(config, "task.select_mode", SELECT_MODES)
  _one_of(config, "model.kind", bihier.KINDS)
  _one_of(config, "model.dtype", _DTYPES)
  _one_of(config, "model.readout", bihier.READOUTS)
  _one_of(config, "model.esm.preset", tuple(esm2.PRESETS))
  _one_of(config, "model.esm.trainable", trainable.POLICIES)
  if _get(config, "model.esm.trainable") == "lora":
    _whole(config, "model.esm.lora_rank", 1)
    for target in _get(config, "model.esm.lora_targets", ()) or ():
      _one_of_value("model.esm.lora_targets", target, esm2.LORA_TARGETS)
    if not _get(config, "model.esm.lora_targets", ()):
      raise ConfigError("model.esm.lora_targets is empty: name some of "
                        f"{' | '.join(esm2.LORA_TARGETS)}")
  _one_of(config, "model.esm.attention", esm2.ATTENTION_KINDS)
  _one_of(config, "model.gnn.level", pronet.LEVELS)
  _one_of(config, "model.fusion.mode", bihier.MODES)
  _one_of(config, "model.fusion.direction", bihier.DIRECTIONS)
  _one_of(config, "model.fusion.write_back", fusion.WRITE_BACKS)
  _one_of(config, "model.head.pooling", _POOLINGS)
  _one_of(config, "optim.schedule", _SCHEDULES)
  _one_of(config, "data.crop", _CROPS)
  _one_of(config, "train.on_corrupt_checkpoint", ON_CORRUPT_CHECKPOINT)
  for name in _get(config, "task.metrics", ()) or ():
    if name not in metrics.ALL:
      guess = closest(str(name), metrics.ALL)
      hint = f" (did you mean {guess!r}?)" if guess else ""
      raise ConfigError(f"task.metrics: {name!r} is not a metric of "
                        f"bihier_jax/training/metrics.py{hint}")
  select = _get(config, "task.select_metric")
  choices = tuple(_get(config, "task.metrics", ()) or ()) + ("loss",)
  if select is not None and select not in choices:
    raise ConfigError(f"task.select_metric={select!r} is not computed: use one of "
                      f"task.metrics or loss ({' | '.join(choices)})")
  loss, classes = _get(config, "task.loss"), _get(config, "task.num_classes")
  if loss in ("sigmoid_bce", "mse") and classes != 1:
    raise ConfigError(f"task.num_classes={classes!r} must be 1 with task.loss={loss}")
  if loss == "softmax_ce":
    _whole(config, "task.num_classes", 2)

  for path in ("train.num_steps", "train.batch_size", "train.eval_every",
               "train.checkpoint_every", "train.log_every", "train.keep_checkpoints",
               "train.max_consecutive_nonfinite", "train.grad_accum_steps", "train.fsdp",
               "model.gnn.num_blocks",
               "model.gnn.hidden", "model.fusion.dim", "model.fusion.num_heads",
               "model.head.hidden", "data.max_neighbors"):
    _whole(config, path, 1)
  _whole(config, "data.max_residues", 1, 1022)
  for path in ("train.num_epochs", "train.eval_every_epochs",
               "train.checkpoint_every_epochs", "optim.step_every_epochs"):
    _non_negative(config, path)
  buckets = _get(config, "data.length_buckets")
  if buckets is not None and (not buckets or any(
      isinstance(b, bool) or not isinstance(b, int) or b < 3 for b in buckets)):
    raise ConfigError(f"data.length_buckets={buckets!r} must be ESM row lengths "
                      f"(whole numbers >= 3), e.g. (128, 256, 512, 1024)")
  dim, num_heads = _get(config, "model.fusion.dim"), _get(config, "model.fusion.num_heads")
  if (_get(config, "model.kind") in ("bihier", "cross") and dim and num_heads
      and dim % num_heads):
    raise ConfigError(f"model.fusion.dim={dim} must be a multiple of "
                      f"model.fusion.num_heads={num_heads}")
  # Everything else the model would reject when it is built (fusion.levels within
  # 1..gnn.num_blocks, layer pairing, esm.last_n, ...), with the model's own message.
  try:
    model = bihier.BiHierConfig.from_config(config)
  except (ValueError, TypeError, KeyError, AttributeError) as e:
    raise ConfigError(str(e).splitlines()[0] if str(e) else repr(e)) from e
  _check_fsdp_remat(_get(config, "train.fsdp", 1), model)


def _check_fsdp_remat(fsdp_size: int, model) -> None:
  """train.fsdp > 1 only with per-layer ESM remat: without it every layer's activations
  stay on the device for the backward pass, and the memory per device is far above
  what parameter sharding is for (docs/parallelism.md, "Memory per device")."""
  if fsdp_size > 1 and model.uses_esm and not model.esm.remat:
    raise ConfigError(f"train.fsdp={fsdp_size} needs model.esm.remat=True (without it "
                      "every ESM layer's activations stay in memory for the backward "
                      "pass): add --config.model.esm.remat=True")


def check(config: ml_collections.ConfigDict, *, needs_data: bool = True) -> None:
  """Raises ConfigError for the first mistake found (see the module docstring)."""
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"the config must be an ml_collections.ConfigDict (get_config() "
                      f"returned {type(config).__name__})")
  if needs_data:
    check_data_dir(config)
  check_values(config)


# --- a run's saved config ------------------------------------------------------------------

def _tuples(value):
  """JSON lists back to the tuples the config files use (hashable, as in the model)."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def load_saved_config(workdir: str) -> ml_collections.ConfigDict:
  """DIR/config.json (written by training) as a locked ConfigDict."""
  path = os.path.join(os.path.expanduser(workdir), "config.json")
  if not os.path.isfile(path):
    raise ConfigError(f"{path} does not exist (no run trained in this workdir): pass "
                      f"--config configs/<task>.py")
  try:
    with open(path) as f:
      values = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ConfigError(f"{path} cannot be read ({e}): pass --config configs/<task>.py"
                      ) from e
  if not isinstance(values, dict):
    raise ConfigError(f"{path} holds no config object: pass --config configs/<task>.py")
  config = ml_collections.ConfigDict(_tuples(values))
  config.lock()
  return config
