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
import re
from typing import Any

import ml_collections

from bihier_jax.common import residue_constants as rc



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
  """The candidate most like `name` (difflib, case ignored), or None if none is close."""
  by_lower = {}
  for candidate in candidates:
    by_lower.setdefault(str(candidate).lower(), candidate)
  found = difflib.get_close_matches(str(name).lower(), list(by_lower), n=1, cutoff=0.6)
  return by_lower[found[0]] if found else None


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
  """data.dir holds prepared records, or the config names a `data.builder` that builds
  them there on first use (the demo)."""
  task = _get(config, "task.name", "")
  directory = str(_get(config, "data.dir", "") or "")
  builder = str(_get(config, "data.builder", "") or "")
  if builder:
    if not directory:
      raise ConfigError(f"data.dir is empty: set --config.data.dir to a folder for the "
                        f"{task} records (built there on first use)")
    if not re.fullmatch(r"[\w.]+:\w+", builder):
      raise ConfigError(f"data.builder={builder!r} must name a function as "
                        "'module:function' (e.g. 'data_pipelines.demo:build_records')")
    return
  command = f"`python -m data_pipelines.preprocess {task or '<task>'} --out DIR`"
  if not directory:
    raise ConfigError(f"data.dir is not set: set --config.data.dir to the folder written "
                      f"by {command}")
  from bihier_jax.common import storage  # pylint: disable=g-import-not-at-top
  path = storage.absolute(directory)
  if not storage.isfile(storage.join(path, "metadata.json")):
    what = "does not exist" if not storage.exists(path) else "has no metadata.json"
    raise ConfigError(f"data.dir={directory} {what}: set --config.data.dir to the folder "
                      f"written by {command}")


def check_values(config: ml_collections.ConfigDict) -> None:
  """Allowed values, types and ranges of the fields that would otherwise fail late."""
  _check_task(config)
  _check_model_values(config)
  _check_run_values(config)
  # Everything else the model would reject when it is built (fusion.levels within
  # 1..gnn.num_blocks, layer pairing, esm.last_n, ...), with the model's own message.
  from bihier_jax.models import bihier  # pylint: disable=g-import-not-at-top
  try:
    model = bihier.BiHierConfig.from_config(config)
  except (ValueError, TypeError, KeyError, AttributeError) as e:
    raise ConfigError(str(e).splitlines()[0] if str(e) else repr(e)) from e
  _check_fsdp_remat(_get(config, "train.fsdp", 1), model)


def _check_task(config) -> None:
  """task.* (level, classes, loss, metrics, selection) and data.incomplete_backbone."""
  # pylint: disable=g-import-not-at-top
  from bihier_jax.data import featurize
  from bihier_jax.models import heads
  from bihier_jax.training import checkpointing
  from bihier_jax.training import metrics
  # pylint: enable=g-import-not-at-top
  _one_of(config, "task.level", heads.LEVELS)
  _one_of(config, "data.incomplete_backbone", featurize.INCOMPLETE_BACKBONE_POLICIES)
  names = _get(config, "task.class_names")
  columns = _get(config, "task.num_classes") if _get(config, "task.loss") == (
      "softmax_ce") else 1
  if names and columns is not None and len(names) != int(columns):
    raise ConfigError(f"task.class_names has {len(names)} name(s) for {columns} "
                      "prediction column(s): give one per class, or () for class_0..")
  _one_of(config, "task.loss", heads.LOSSES)
  _one_of(config, "task.select_mode", checkpointing.SELECT_MODES)
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


def _check_model_values(config) -> None:
  """model.* values, named with a "did you mean" hint (BiHierConfig.from_config then
  checks how they combine)."""
  # pylint: disable=g-import-not-at-top
  from bihier_jax import models
  from bihier_jax.common import esm_shapes
  from bihier_jax.models import attention_backends
  from bihier_jax.models import bihier
  from bihier_jax.models import esm2
  from bihier_jax.models import fusion
  from bihier_jax.models import heads
  from bihier_jax.models import pronet
  from bihier_jax.models import trainable
  # pylint: enable=g-import-not-at-top
  _one_of(config, "model.kind", bihier.KINDS)
  _one_of(config, "model.dtype", models.DTYPES)
  _one_of(config, "model.readout", bihier.READOUTS)
  preset = _get(config, "model.esm.preset")
  if preset is not None:
    try:
      esm2.preset_architecture(preset)
    except ValueError:
      guess = closest(str(preset), esm2.PRESETS)
      hint = f" (did you mean {guess!r}?)" if guess else ""
      raise ConfigError(f"model.esm.preset={preset!r} is not one of "
                        f"{' | '.join(esm2.PRESETS)}{hint}") from None
  _one_of(config, "model.esm.trainable", trainable.POLICIES)
  if _get(config, "model.esm.trainable") == "lora":
    _whole(config, "model.esm.lora_rank", 1)
    for target in _get(config, "model.esm.lora_targets", ()) or ():
      _one_of_value("model.esm.lora_targets", target, esm2.LORA_TARGETS)
    if not _get(config, "model.esm.lora_targets", ()):
      raise ConfigError("model.esm.lora_targets is empty: name some of "
                        f"{' | '.join(esm2.LORA_TARGETS)}")
  _one_of(config, "model.esm.attention", attention_backends.ATTENTION_KINDS)
  _pallas_row_length(config, esm_shapes.pallas_row_multiple(
      str(_get(config, "model.esm.attention", "auto"))))
  _one_of(config, "model.gnn.level", pronet.LEVELS)
  _one_of(config, "model.fusion.mode", bihier.MODES)
  _one_of(config, "model.fusion.direction", bihier.DIRECTIONS)
  _one_of(config, "model.fusion.write_back", fusion.WRITE_BACKS)
  _one_of(config, "model.head.pooling", heads.POOLINGS)
  dim, num_heads = _get(config, "model.fusion.dim"), _get(config, "model.fusion.num_heads")
  if (_get(config, "model.kind") in ("bihier", "cross") and dim and num_heads
      and dim % num_heads):
    raise ConfigError(f"model.fusion.dim={dim} must be a multiple of "
                      f"model.fusion.num_heads={num_heads}")


def _check_run_values(config) -> None:
  """optim.schedule, data.crop, train.on_corrupt_checkpoint and the numeric fields."""
  # pylint: disable=g-import-not-at-top
  from bihier_jax.data import batch_plan
  from bihier_jax.training import checkpointing
  from bihier_jax.training import optim
  # pylint: enable=g-import-not-at-top
  _one_of(config, "optim.schedule", optim.SCHEDULES)
  _one_of(config, "data.crop", batch_plan.CROPS)
  _one_of(config, "data.eval_long_chains", batch_plan.EVAL_LONG_CHAINS)
  _one_of(config, "train.on_corrupt_checkpoint", checkpointing.ON_CORRUPT)
  for path in ("train.num_steps", "train.batch_size", "train.eval_every",
               "train.checkpoint_every", "train.log_every", "train.keep_checkpoints",
               "train.max_consecutive_nonfinite", "train.grad_accum_steps", "train.fsdp",
               "model.gnn.num_blocks",
               "model.gnn.hidden", "model.fusion.dim", "model.fusion.num_heads",
               "model.head.hidden", "data.max_neighbors"):
    _whole(config, path, 1)
  _whole(config, "data.max_residues", 1, rc.ESM_MAX_RESIDUES)
  for path in ("train.num_epochs", "train.eval_every_epochs",
               "train.checkpoint_every_epochs", "optim.step_every_epochs"):
    _non_negative(config, path)
  buckets = _get(config, "data.length_buckets")
  if buckets is not None and (not buckets or any(
      isinstance(b, bool) or not isinstance(b, int) or b < 3 for b in buckets)):
    raise ConfigError(f"data.length_buckets={buckets!r} must be ESM row lengths "
                      f"(whole numbers >= 3), e.g. (128, 256, 512, 1024)")


def _check_fsdp_remat(fsdp_size: int, model) -> None:
  """train.fsdp > 1 only with per-layer ESM remat: without it every layer's activations
  stay on the device for the backward pass, and the memory per device is far above
  what parameter sharding is for (docs/parallelism.md, "Memory per device")."""
  if fsdp_size > 1 and model.uses_esm and not model.esm.remat:
    raise ConfigError(f"train.fsdp={fsdp_size} needs model.esm.remat=True (without it "
                      "every ESM layer's activations stay in memory for the backward "
                      "pass): add --config.model.esm.remat=True")


def _pallas_row_length(config, multiple: int) -> None:
  """A forced packing row length must fill whole blocks of a Pallas attention kernel
  (other row lengths are rounded up to them by the data pipeline)."""
  value = _get(config, "data.row_length")
  if (multiple == 1 or isinstance(value, bool) or not isinstance(value, int)
      or value <= 0 or value % multiple == 0):
    return
  kind = _get(config, "model.esm.attention")
  fits = " or ".join(str(x) for x in (value // multiple * multiple,
                                      -(-value // multiple) * multiple) if x > 0)
  raise ConfigError(f"data.row_length={value} is not a multiple of {multiple}, the block "
                    f"of the model.esm.attention={kind!r} kernel: use {fits}, or 0 "
                    "(chosen for the model)")


def check(config: ml_collections.ConfigDict, *, needs_data: bool = True) -> None:
  """Raises ConfigError for the first mistake found (see the module docstring)."""
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"the config must be an ml_collections.ConfigDict (get_config() "
                      f"returned {type(config).__name__})")
  if needs_data:
    check_data_dir(config)
  check_values(config)
  check_batch_split(config)


# --- ESM-2 checkpoint ----------------------------------------------------------------------

def check_esm_checkpoint(config: ml_collections.ConfigDict,
                         explicit_preset: str | None = None) -> str | None:
  """Sets model.esm.preset to the architecture of model.esm.checkpoint (if one is given).

  Reads the checkpoint's config.json (or a `.pt`'s shapes), not its weights. A preset
  in a config file is a default for random weights, which the checkpoint replaces; one
  named on the command line (`explicit_preset`) must agree with it.

  Returns:
    A line for the log when the preset changed, else None.

  Raises:
    ConfigError: the checkpoint cannot be read, is no ESM-2, or conflicts with
      `explicit_preset`.
  """
  path = str(_get(config, "model.esm.checkpoint", "") or "")
  if not path or _get(config, "model.kind") == "gnn_only":
    return None
  # pylint: disable=g-import-not-at-top
  from bihier_jax.models import esm2
  from bihier_jax.models.esm2 import checkpoint as esm2_checkpoint
  # pylint: enable=g-import-not-at-top
  where = f"model.esm.checkpoint={path}"
  try:
    found = esm2_checkpoint.read_architecture(path)
  except FileNotFoundError as e:
    reason = str(e).removeprefix(f"{path}: ")
    raise ConfigError(f"{where}: {reason}: give a Hugging Face ESM-2 folder, a fair-esm "
                      ".pt file or a folder written by bihier_jax.convert_esm "
                      "(docs/pretrained.md)") from e
  except (ImportError, ValueError, KeyError) as e:  # CheckpointMismatchError included
    reason = str(e).splitlines()[0].removeprefix(f"{path}: ")
    raise ConfigError(f"{where}: {reason}") from e
  name = esm2.preset_name(found)
  shape = esm2_checkpoint.describe(found)
  if explicit_preset is not None and explicit_preset != name:
    raise ConfigError(f"--config.model.esm.preset={explicit_preset} conflicts with {where}"
                      f", a {name} checkpoint ({shape}): leave the preset out (it is "
                      "read from the checkpoint) or give a checkpoint of that size")
  configured = _get(config, "model.esm.preset")
  if configured == name:
    return None
  config.model.esm.preset = name
  return (f"model.esm.preset={name} read from {where} ({shape}; the config file said "
          f"{configured})")


# --- batch, accumulation, devices ---------------------------------------------------------

def _divisors(n: int) -> str:
  found = [str(d) for d in range(1, n + 1) if n % d == 0]
  return ", ".join(found[:-1]) + " or " + found[-1] if len(found) > 1 else found[0]


def _batch_fields(config) -> tuple[int, int, int]:
  """(train.batch_size, train.grad_accum_steps, train.fsdp), defaults 1."""
  return tuple(int(_get(config, f"train.{name}", 1) or 1)
               for name in ("batch_size", "grad_accum_steps", "fsdp"))


def check_batch_split(config: ml_collections.ConfigDict) -> None:
  """What train.batch_size, grad_accum_steps and fsdp must satisfy on any devices: the
  global batch is split into devices x grad_accum_steps equal sub-batches, and the
  devices are a multiple of train.fsdp."""
  batch, accum, fsdp = _batch_fields(config)
  if batch % accum:
    raise ConfigError(
        f"train.batch_size={batch} is not a multiple of train.grad_accum_steps={accum} "
        f"(each update sums {accum} equal micro-batches): set --config.train."
        f"grad_accum_steps to {_divisors(batch)}, or --config.train.batch_size to a "
        f"multiple of {accum}")
  if batch % (accum * fsdp):
    raise ConfigError(
        f"train.fsdp={fsdp} needs train.batch_size={batch} to be a multiple of {fsdp} "
        f"x train.grad_accum_steps={accum} (every device of an fsdp group takes its own "
        f"sub-batch): set --config.train.fsdp to {_divisors(batch // accum)} (one that "
        f"divides your devices per host), or --config.train.batch_size to a multiple of "
        f"{accum * fsdp}")


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def check_devices(config: ml_collections.ConfigDict, num_devices: int,
                  devices_per_host) -> None:
  """The batch split and fsdp groups on these devices (all hosts; devices of each host).

  Raises:
    ConfigError: train.fsdp does not divide the devices of a host, or train.batch_size
      is no multiple of the devices x train.grad_accum_steps; the message names the fix.
  """
  check_batch_split(config)
  batch, accum, fsdp = _batch_fields(config)
  for per_host in sorted(set(int(n) for n in devices_per_host)):
    if per_host % fsdp:
      raise ConfigError(
          f"train.fsdp={fsdp} does not divide the {per_host} device(s) of "
          f"{'each host' if num_devices > per_host else 'this machine'} (an fsdp group "
          f"stays within one host): set --config.train.fsdp to {_divisors(per_host)}")
  if batch % (num_devices * accum):
    raise ConfigError(
        f"train.batch_size={batch} is not a multiple of the {num_devices} devices x "
        f"train.grad_accum_steps={accum} (one padded sub-batch per device and "
        f"micro-batch): set --config.train.batch_size="
        f"{_round_up(batch, num_devices * accum)}, or run on fewer devices (a divisor "
        f"of {batch // accum})")


def fit_to_devices(config: ml_collections.ConfigDict, num_devices: int,
                   devices_per_host) -> tuple[ml_collections.ConfigDict, str | None]:
  """A copy of a trained run's config that evaluation can run on these devices.

  Evaluation needs no accumulation and any fsdp group size that divides the devices of
  a host: train.fsdp becomes its largest divisor that does, and train.batch_size a
  multiple of the devices (the per-device sub-batch as close to training's as known).
  The numbers do not depend on either (each protein is scored whole).

  Returns:
    (config, a line saying what changed, or None when nothing had to).
  """
  batch, accum, fsdp = _batch_fields(config)
  per_host = min(int(n) for n in devices_per_host)
  new_fsdp = max(d for d in range(1, fsdp + 1) if fsdp % d == 0 and per_host % d == 0)
  fits = batch % (num_devices * accum) == 0
  if new_fsdp == fsdp and fits:
    return config, None
  out = ml_collections.ConfigDict(config.to_dict())
  changes = []
  if new_fsdp != fsdp:
    out.train.fsdp = new_fsdp
    changes.append(f"train.fsdp {fsdp} -> {new_fsdp}")
  if not fits:
    sub = max(1, batch // (num_devices * accum))
    out.train.grad_accum_steps, out.train.batch_size = 1, sub * num_devices
    changes.append(f"train.batch_size {batch} -> {sub * num_devices}, "
                   f"train.grad_accum_steps {accum} -> 1")
  out.lock()
  return out, (f"evaluating on the {num_devices} device(s) here: {', '.join(changes)} "
               "(the metrics do not depend on them)")


def describe_layout(config: ml_collections.ConfigDict, num_devices: int,
                    num_hosts: int) -> str:
  """One line: the mesh, the batch split and the compute dtype of a training run."""
  batch, accum, fsdp = _batch_fields(config)
  data = num_devices // fsdp
  mesh = f"data={data} x fsdp={fsdp}" if fsdp > 1 else f"data={data}"
  return (f"mesh {mesh} over {num_devices} device(s) on {num_hosts} host(s); global "
          f"batch {batch} = {num_devices} device(s) x train.grad_accum_steps={accum} x "
          f"{batch // max(num_devices * accum, 1)} protein(s) per sub-batch at most; "
          f"compute dtype {_get(config, 'model.dtype', 'float32')}")


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
