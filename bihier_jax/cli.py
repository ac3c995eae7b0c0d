"""What every absl command-line entry point (train, eval, predict) does first.

An entry point defines its own flags (not --config); `main(argv)` calls `cli.start(argv)`
and `__main__` calls `cli.run(main, config_help=..., workdir_config=...)`. `run` defines
--config (or reads WORKDIR/config.json), parses the command line and validates the
config before `main` runs. Public: run, start, check_devices, fit_to_devices,
config_from_workdir, quiet_library_logs, CommandLineError. User errors end in one line
and exit status 2, Ctrl-C outside the loop in status 130: docs/training.md "Errors".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import functools
import importlib.util
import logging as std_logging
import os
import re
import sys
import traceback

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from bihier_jax import config_check
from bihier_jax.common import host

FLAGS = flags.FLAGS
# numexpr (imported with pandas) announces its thread count at INFO when it is imported,
# before the backend line that starts every run's log.
std_logging.getLogger("numexpr.utils").setLevel(std_logging.WARNING)
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
# Lines the flag parser has to say once logging is set up (`check_devices` logs them).
_PENDING_LOG: list[str] = []
_HELP_FLAGS = ("help", "helpshort", "helpfull", "helpxml", "?", "h")


class CommandLineError(ValueError):
  """A mistake on the command line other than in the config."""


def config_from_workdir(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was trained with (WORKDIR/config.json), locked.

  Raises:
    config_check.ConfigError: no readable config.json in `workdir`.
  """
  return config_check.load_saved_config(workdir)


def run(main: Callable[[list[str]], None], *, config_help: str,
        workdir_config: bool = False, needs_data: bool = True,
        esm_checkpoint: bool = False) -> None:
  """`app.run(main)` with --config defined, parsed and validated first.

  Args:
    main: the entry point's main(argv).
    config_help: help text of --config.
    workdir_config: without --config, read WORKDIR/config.json (--workdir's value).
    needs_data: the command reads config.data.dir (train, eval; not predict).
    esm_checkpoint: the command loads model.esm.checkpoint (train): its architecture
      sets model.esm.preset.
  """
  parser = functools.partial(_parse_flags, config_help=config_help,
                             workdir_config=workdir_config, needs_data=needs_data,
                             esm_checkpoint=esm_checkpoint)
  app.run(functools.partial(_run_main, main), flags_parser=parser)


def start(argv) -> None:
  """Refuses stray arguments, tunes the host allocator, quiets chatty library logs.

  Call it first in `main(argv)`, before importing anything that runs JAX or TensorFlow:
  the allocator settings only reach threads created after them (bihier_jax.common.host).
  """
  if len(argv) > 1:
    raise CommandLineError(f"unexpected arguments {argv[1:]}: flags take the form "
                           f"--name=value")
  host.tune_malloc()
  # TensorFlow (only tf.data runs here, no TF math) announces its oneDNN kernels in an
  # INFO line at import that TF_CPP_MIN_LOG_LEVEL does not silence; the option only
  # concerns TF's own matmuls and convolutions, which the input pipeline never runs.
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  quiet_library_logs()


def _devices_per_host() -> tuple[int, list[int]]:
  import jax  # pylint: disable=g-import-not-at-top
  counts: dict[int, int] = {}
  for d in jax.devices():
    counts[d.process_index] = counts.get(d.process_index, 0) + 1
  return jax.device_count(), list(counts.values())


def check_devices(config: ml_collections.ConfigDict) -> None:
  """Starts JAX (joining the multi-host job if config.train.multi_host), then checks
  the batch split and fsdp groups against its devices and logs the layout.

  Raises:
    config_check.ConfigError: the batch or fsdp groups do not fit the devices.
  """
  from bihier_jax.training import runtime  # pylint: disable=g-import-not-at-top
  runtime.start_backend(bool(config.train.get("multi_host", False)))
  while _PENDING_LOG:  # after the backend line, which opens every run's log
    logging.info("%s", _PENDING_LOG.pop(0))
  num_devices, per_host = _devices_per_host()
  config_check.check_devices(config, num_devices, per_host)
  logging.info("%s", config_check.describe_layout(config, num_devices, len(per_host)))


def fit_to_devices(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A trained run's config adapted to the devices here (`config_check.fit_to_devices`:
  an FSDP run evaluates on fewer devices), saying so in the log. Starts JAX (one
  process: a multi-host job has to be joined first)."""
  from bihier_jax.training import runtime  # pylint: disable=g-import-not-at-top
  runtime.start_backend(False)
  num_devices, per_host = _devices_per_host()
  fitted, note = config_check.fit_to_devices(config, num_devices, per_host)
  if note:
    logging.warning("%s", note)
  return fitted


# --- log hygiene ----------------------------------------------------------------------------

# Libraries whose INFO records (one per checkpoint file rename, thread hand-off, ...)
# bury the training progress; their warnings and errors still show.
_CHATTY_LIBRARIES = ("/orbax/",)
# Orbax warnings that describe our own settings and ask nothing of the user: opening a
# checkpoint directory read-only (eval, predict), and saves without validation metrics
# (periodic checkpoints between evaluations).
_EXPECTED_WARNINGS = re.compile(
    r"Given directory is read only|read_only=True, setting save_interval_steps"
    r"|Requested `tracked_metric`; did not provide metrics")


# JAX tries every platform it knows and says so at INFO when one is absent ("Unable to
# initialize backend 'tpu': ... libtpu.so" on every CPU command); the backend it did
# start opens every run's log (training.runtime.start_backend).
_ABSENT_BACKEND = re.compile(r"^Unable to initialize backend '")


class _DropLibraryInfo(std_logging.Filter):

  def filter(self, record: std_logging.LogRecord) -> bool:
    if (record.levelno < std_logging.WARNING and "xla_bridge" in record.pathname
        and _ABSENT_BACKEND.match(record.getMessage())):
      return False
    ours = not any(part in record.pathname for part in _CHATTY_LIBRARIES)
    if ours or record.levelno >= std_logging.ERROR:
      return True
    if record.levelno >= std_logging.WARNING:
      return not _EXPECTED_WARNINGS.search(record.getMessage())
    return False


def quiet_library_logs() -> None:
  """Keeps only warnings and errors of chatty libraries in the absl log (less the
  warnings that are expected)."""
  # The absl handler (absl apps) and the absl logger (also outside absl apps, e.g.
  # launch.ablate reading checkpoints, where records go to Python's default handler).
  for target in (logging.get_absl_handler(), std_logging.getLogger("absl")):
    if not any(isinstance(f, _DropLibraryInfo) for f in target.filters):
      target.addFilter(_DropLibraryInfo())


# --- parsing -------------------------------------------------------------------------------

def _flag_value(argv: Sequence[str], name: str) -> str | None:
  """The value of --name=V / --name V in argv (last one wins), else None."""
  value = None
  for i, arg in enumerate(argv[1:], start=1):
    if arg == "--":
      break
    match = re.fullmatch(rf"--?{re.escape(name)}(=(.*))?", arg, flags=re.DOTALL)
    if match:
      if match.group(1) is not None:
        value = match.group(2)
      elif i + 1 < len(argv):
        value = argv[i + 1]
  return value


def _verbosity(argv: Sequence[str]) -> int:
  for name in ("verbosity", "v"):
    value = _flag_value(argv, name)
    if value is not None:
      try:
        return int(value)
      except ValueError:
        return 0
  return 0


def _overrides(argv: Sequence[str]) -> list[str]:
  """Field paths named by --config.a.b=... (or --noconfig.a.b) arguments."""
  paths = []
  for arg in argv[1:]:
    if arg == "--":
      break
    match = re.match(r"--?(?:no)?config\.([^=]+)", arg)
    if match:
      paths.append(match.group(1))
  return paths


def _bad_override(argv: Sequence[str], config: ml_collections.ConfigDict) -> str | None:
  for path in _overrides(argv):
    problem = config_check.unknown_field(path, config, prefix="--config.")
    if problem:
      return problem
  return None


def _config_file(spec: str) -> str:
  """The .py path of a --config value (before ':variant'), which must exist."""
  path = spec.split(":", 1)[0]
  if os.path.isfile(path):
    return path
  folder = os.path.dirname(path) or "."
  if not os.path.isdir(folder):
    folder = "configs" if os.path.isdir("configs") else "."
  names = sorted(n for n in os.listdir(folder) if n.endswith(".py") and not
                 n.startswith("_"))
  guess = config_check.closest(os.path.basename(path), names)
  hint = (f" (did you mean {os.path.join(folder, guess)}?)" if guess else
          f"; config files in {folder}: {', '.join(names)}" if names else "")
  raise config_check.ConfigError(f"config file {path} not found{hint}")


def _load_config_file(spec: str) -> ml_collections.ConfigDict:
  """What --config SPEC gives: get_config(variant) of the file (ml_collections' rule)."""
  path, _, variant = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("config_file", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variant) if ":" in spec else module.get_config()


def _define_config(argv, *, config_help, workdir_config):
  """Defines --config from the command line; returns its file spec (None: workdir's)."""
  spec = _flag_value(argv, "config")
  workdir = _flag_value(argv, "workdir")
  wants_help = any(_flag_value(argv, name) is not None or f"--{name}" in argv
                   or f"-{name}" in argv for name in _HELP_FLAGS)
  if spec is not None or wants_help or not (workdir_config and workdir):
    if spec is None and not wants_help:
      how = " (or a --workdir of a trained run, which has config.json)" if (
          workdir_config) else ""
      raise CommandLineError(f"--config is required: pass --config configs/<task>.py"
                             f"{how}")
    if spec is not None:
      _config_file(spec)
    config_flags.DEFINE_config_file("config", None, config_help, lock_config=True)
  else:
    config = config_from_workdir(workdir)
    problem = _bad_override(argv, config)
    if problem:
      raise config_check.ConfigError(problem)
    config_flags.DEFINE_config_dict("config", config, config_help, lock_config=True)
  # Listed with the entry point's own flags in --helpshort.
  FLAGS.register_flag_by_module(sys.argv[0], FLAGS["config"])
  return spec


def _parse_flags(argv, *, config_help, workdir_config, needs_data, esm_checkpoint):
  try:
    spec = _define_config(argv, config_help=config_help, workdir_config=workdir_config)
    try:
      args = FLAGS(argv)
    except flags.Error:
      raise
    except Exception as e:  # pylint: disable=broad-except
      # ml_collections raises AttributeError/KeyError for an unknown --config.x.y.
      problem = _bad_override(argv, _load_config_file(spec)) if spec else None
      if problem:
        raise config_check.ConfigError(problem) from e
      raise
    config_check.check(FLAGS.config, needs_data=needs_data)
    if esm_checkpoint:
      note = config_check.check_esm_checkpoint(
          FLAGS.config, _flag_value(argv, "config.model.esm.preset"))
      if note:
        _PENDING_LOG.append(note)
        config_check.check_values(FLAGS.config)  # with the checkpoint's depth
  except SystemExit:
    raise
  except Exception as e:  # pylint: disable=broad-except
    _fail(e, argv)
  return args


# --- errors --------------------------------------------------------------------------------

def _user_error_types() -> tuple[type[BaseException], ...]:
  """Exceptions whose message tells the user what to do (classes of loaded modules)."""
  types = [config_check.ConfigError, CommandLineError, FileNotFoundError]
  for module, name in (("bihier_jax.common.structure", "StructureError"),
                       ("bihier_jax.data.from_files", "InputError"),
                       ("bihier_jax.training.checkpointing", "CheckpointError"),
                       ("bihier_jax.training.runtime", "StartupError"),
                       ("bihier_jax.training.train_lib", "NonFiniteLossError")):
    if module in sys.modules:
      types.append(getattr(sys.modules[module], name))
  return tuple(types)


def _message(error: BaseException) -> str:
  text = str(error).strip()
  if isinstance(error, flags.Error):
    if "Error whilst parsing config file" in text:
      # The config file's own exception, as the last line of the traceback absl quotes.
      text = text.splitlines()[-1].strip()
      text = re.sub(r"^\w+(Error|Exception): ", "", text)
    text = re.sub(r"^flag (--\S+)", r"\1", text.splitlines()[0] if text else text)
    return text
  if isinstance(error, _user_error_types()):
    return " ".join(text.split("\n")[0:1]) or type(error).__name__
  return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def _fail(error: BaseException, argv: Sequence[str]) -> None:
  if _verbosity(argv) >= 1:
    traceback.print_exception(error)
  print(f"error: {_message(error)}", file=sys.stderr, flush=True)
  sys.exit(EXIT_USER_ERROR)


def _run_main(main, argv):
  try:
    main(argv)
  except _user_error_types() as e:
    _fail(e, sys.argv)
  except KeyboardInterrupt:
    # Ctrl-C outside the training loop (start-up, final evaluation): the checkpoints
    # already written stay; the loop itself saves first (train_lib).
    print("interrupted (Ctrl-C): stopped; checkpoints already written are kept",
          file=sys.stderr, flush=True)
    sys.exit(EXIT_INTERRUPTED)
