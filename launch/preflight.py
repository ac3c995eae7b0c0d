"""The launchers' config check: what `python -m bihier_jax.train` would refuse, found on
this machine before any command is printed or run.

`check_train_config(spec, overrides, ...)` loads the config file as the train command
does (`configs/react.py:tiny`, then each `--set key=value` as `--config.key=value`),
then applies the train command's checks (`bihier_jax.config_check`): unknown fields
with the closest name, allowed values, the batch split over the devices when the
launcher knows them (TPU accelerator type, SLURM nodes x GPUs), and where the data and
ESM-2 weights must be. Every mistake is a `ConfigError` with one line.

Remote paths (gs://...) are not opened here (this machine may lack the bucket's
credentials): the workers read them. Local paths are checked where the workers share
this machine's file system (SLURM), and refused where they cannot (TPU VMs).
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import flags
import ml_collections
from ml_collections import config_flags

from bihier_jax import cli
from bihier_jax import config_check
from bihier_jax.common import storage

ConfigError = config_check.ConfigError
_CLOUD_DOC = "docs/cloud.md"


def load_config(spec: str, overrides: Sequence[str]) -> ml_collections.ConfigDict:
  """The config `--config SPEC --config.k=v ...` gives the train command."""
  cli._config_file(spec)  # pylint: disable=protected-access
  config = cli._load_config_file(spec)  # pylint: disable=protected-access
  for item in overrides:
    key = item.split("=", 1)[0].strip()
    problem = config_check.unknown_field(key, config, prefix="--set ")
    if problem:
      raise ConfigError(problem)
  argv = ["launch", *(f"--config.{item.strip()}" for item in overrides)]
  values = flags.FlagValues()
  # ml_collections defines a flag per override it finds in sys_argv.
  config_flags.DEFINE_config_dict("config", config, flag_values=values,
                                  lock_config=True, sys_argv=argv)
  try:
    values(argv)
  except flags.Error as e:
    raise ConfigError(str(e).splitlines()[0].replace("--config.", "--set ")) from e
  return values.config


def _check_location(field: str, value: str) -> None:
  """A local path given to workers that share no disk with this machine."""
  if value and not storage.is_url(value):
    raise ConfigError(f"{field}={value} is on this machine; TPU workers share no disk: "
                      f"copy it to a bucket and --set {field}=gs://... ({_CLOUD_DOC})")


def check_train_config(spec: str, overrides: Sequence[str] = (), *,
                       devices: int | None = None,
                       devices_per_host: int | None = None,
                       local_paths: str = "check") -> ml_collections.ConfigDict:
  """The resolved training config; raises ConfigError (one line, in the launcher's
  flags: `--set key=value`) for any mistake.

  Args:
    spec: --config value (`configs/react.py` or `configs/demo.py:tiny`).
    overrides: `key=value` items the train command gets (the launchers' --set, then
      what their --fsdp adds: `tpu_vm.launched_overrides`).
    devices, devices_per_host: JAX devices of the job and of each host, when known.
    local_paths: what a local data.dir / model.esm.checkpoint means: 'check' (the
      workers share this machine's file system: SLURM), 'refuse' (TPU VMs share no
      disk: use a bucket), 'skip' (a single TPU VM's own disk: not visible here).
  """
  try:
    return _check(spec, overrides, devices=devices,
                  devices_per_host=devices_per_host, local_paths=local_paths)
  except ConfigError as e:
    message = str(e).replace("set --config.", "pass --set ")
    raise ConfigError(message.replace("--config.", "--set ")) from e


def _check(spec, overrides, *, devices, devices_per_host, local_paths):
  config = load_config(spec, overrides)
  data_dir = str(config.data.get("dir", "") or "")
  checkpoint = str(config.model.esm.get("checkpoint", "") or "")
  if local_paths == "refuse":
    _check_location("data.dir", data_dir)
    _check_location("model.esm.checkpoint", checkpoint)
  check_here = local_paths == "check"
  if not data_dir or (check_here and not storage.is_url(data_dir)):
    config_check.check(config, needs_data=True)
  else:  # the records are the workers' to find
    config_check.check(config, needs_data=False)
  if checkpoint and check_here and not storage.is_url(checkpoint):
    explicit = next((item.split("=", 1)[1].strip() for item in reversed(overrides)
                     if item.split("=", 1)[0].strip() == "model.esm.preset"), None)
    config_check.check_esm_checkpoint(config, explicit)
  if devices is not None and devices_per_host is not None:
    config_check.check_devices(config, devices,
                               [devices_per_host] * max(devices // devices_per_host, 1))
  return config
