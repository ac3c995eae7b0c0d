"""Cloud TPU VM launcher: create, install, train, logs, status, delete.

  python -m launch.tpu_vm create --name bh --zone us-central2-b \
      --accelerator-type v4-32 --queued --spot --dry-run
  python -m launch.tpu_vm install --name bh --zone us-central2-b --dry-run

Every subcommand builds `gcloud` argv lists and prints them (`--dry-run`) or runs them
in order, stopping at the first failure; every remote step uses `--worker=all`, so a
pod slice differs from a single host only in its accelerator type. Workers share no
disk: records and workdir on gs:// (docs/cloud.md). The install pins jax[tpu] to
setup.cfg's jax. The walk-through: launch/README.md, "Cloud TPU VM".
"""

from __future__ import annotations

import argparse
import configparser
import dataclasses
import os
import shlex
import subprocess
import sys
from typing import Sequence

# TPU VM base image: plain Ubuntu; jax[tpu] (with libtpu) comes from pip.
DEFAULT_VERSION = "tpu-ubuntu2204-base"
DEFAULT_ACCELERATOR = "v4-8"
SETUP_CFG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "setup.cfg")
REMOTE_DIR = "~/bihier_jax"
REMOTE_VENV = "~/bihier_venv"
REMOTE_LOG = "~/bihier_train.log"
REMOTE_PYTHON = "python3.11"
LOCAL_ARCHIVE = "/tmp/bihier_jax_src.tar.gz"

Command = list[str]



def jax_tpu_requirement(setup_cfg: str = SETUP_CFG) -> str:
  """`jax[tpu]==V`, V the jax pin of setup.cfg: the TPU wheel of the release installed."""
  parser = configparser.ConfigParser()
  parser.read(setup_cfg)
  for line in parser.get("options", "install_requires", fallback="").splitlines():
    if line.strip().startswith("jax=="):
      return "jax[tpu]" + line.strip()[len("jax"):]
  raise ValueError(f"{setup_cfg}: no jax==VERSION in [options] install_requires")

@dataclasses.dataclass(frozen=True)
class Target:
  """Where the TPU lives."""
  name: str  # TPU node id (also the queued-resource id with --queued)
  zone: str
  project: str = ""

  def flags(self) -> list[str]:
    out = [f"--zone={self.zone}"]
    if self.project:
      out.append(f"--project={self.project}")
    return out


def _tpu_vm(target: Target, verb: str, *args: str) -> Command:
  return ["gcloud", "compute", "tpus", "tpu-vm", verb, *args, *target.flags()]


def _queued(target: Target, verb: str, *args: str) -> Command:
  return ["gcloud", "compute", "tpus", "queued-resources", verb, *args,
          *target.flags()]


def ssh_all(target: Target, remote_command: str, worker: str = "all") -> Command:
  """One shell command on every worker (`--worker=all`) or one (`--worker=0`)."""
  return _tpu_vm(target, "ssh", target.name, f"--worker={worker}",
                 f"--command={remote_command}")


def create_commands(target: Target, accelerator_type: str = DEFAULT_ACCELERATOR,
                    version: str = DEFAULT_VERSION, spot: bool = False,
                    queued: bool = False) -> list[Command]:
  """Creates a TPU VM (or pod slice) directly, or through the queued-resources API.

  Direct creation fails at once when capacity is short; a queued resource waits in the
  queue until it can be provisioned (poll it with `status`).
  """
  if queued:
    cmd = _queued(target, "create", target.name, f"--node-id={target.name}",
                  f"--accelerator-type={accelerator_type}",
                  f"--runtime-version={version}")
  else:
    cmd = _tpu_vm(target, "create", target.name,
                  f"--accelerator-type={accelerator_type}", f"--version={version}")
  if spot:
    cmd.append("--spot")
  return [cmd]


def install_commands(target: Target, archive: str = LOCAL_ARCHIVE,
                     ref: str = "HEAD") -> list[Command]:
  """Copies this repository (committed `ref`) to every worker and installs it.

  Run from the repository root. Steps: `git archive` locally, scp to all workers,
  Python 3.11 from apt if missing, unpack, venv, pip install `jax[tpu]` and the
  project. Every worker must run identical code.
  """
  remote_archive = "~/" + archive.rsplit("/", 1)[-1]
  setup = " && ".join([
      # The base image (Ubuntu 22.04) has Python 3.10; the project needs >= 3.11.
      f"(command -v {REMOTE_PYTHON} >/dev/null || (sudo apt-get update -q && "
      f"sudo apt-get install -y -q {REMOTE_PYTHON} {REMOTE_PYTHON}-venv))",
      f"rm -rf {REMOTE_DIR}", f"mkdir -p {REMOTE_DIR}",
      f"tar -xzf {remote_archive} -C {REMOTE_DIR}",
      f"{REMOTE_PYTHON} -m venv {REMOTE_VENV}",
      f"{REMOTE_VENV}/bin/pip install -q --upgrade pip",
      f"{REMOTE_VENV}/bin/pip install -q '{jax_tpu_requirement()}' -e {REMOTE_DIR}",
      f"{REMOTE_VENV}/bin/python -c 'import jax; print(jax.process_index(), "
      f"jax.device_count())'",
  ])
  return [
      ["git", "archive", "--format=tar.gz", f"--output={archive}", ref],
      _tpu_vm(target, "scp", archive, f"{target.name}:~/", "--worker=all"),
      ssh_all(target, setup),
  ]


def config_override_flags(overrides: Sequence[str]) -> list[str]:
  """`key=value` -> `--config.key=value` (ml_collections config flags)."""
  out = []
  for item in overrides:
    if "=" not in item:
      raise ValueError(f"--set {item!r}: expected key=value, e.g. train.num_steps=1000")
    out.append(f"--config.{item}")
  return out


FSDP_KEY = "train.fsdp"


def fsdp_from_flags(fsdp: int | None, overrides: Sequence[str] = ()
                    ) -> tuple[int | None, str]:
  """`train.fsdp` as the command line sets it, and how it was given (for messages).

  `--fsdp N` (the `fsdp` argument) or `--set train.fsdp=M`; both only with the same
  value. (None, "") when neither sets it: the config's value holds.

  Raises:
    ValueError: --fsdp and --set train.fsdp disagree, or the value is not an int >= 1.
  """
  set_values = [item.split("=", 1)[1].strip() for item in overrides
                if "=" in item and item.split("=", 1)[0].strip() == FSDP_KEY]
  if fsdp is not None:
    for value in set_values:
      if value != str(fsdp):
        raise ValueError(f"--fsdp {fsdp} conflicts with --set {FSDP_KEY}={value}: "
                         "give only one of them (or the same value)")
    value, given = fsdp, f"--fsdp {fsdp}"
  elif set_values:
    # The last --set wins, as for any repeated config flag.
    try:
      value = int(set_values[-1])
    except ValueError:
      raise ValueError(f"--set {FSDP_KEY}={set_values[-1]}: expected an integer "
                       ">= 1") from None
    given = f"--set {FSDP_KEY}={set_values[-1]}"
  else:
    return None, ""
  if value < 1:
    raise ValueError(f"{given}: the fsdp group size must be an integer >= 1")
  return value, given


REMAT_KEY = "model.esm.remat"


def fsdp_flags(fsdp: int | None, overrides: Sequence[str] = ()) -> list[str]:
  """`--fsdp N` -> `--config.train.fsdp=N` (nothing when not given), and
  `--config.model.esm.remat=True` whenever train.fsdp (from --fsdp or --set) is above 1
  and no `--set model.esm.remat=...` is given: config_check refuses train.fsdp > 1
  without per-layer remat (the memory figures of docs/parallelism.md assume it)."""
  value, _ = fsdp_from_flags(fsdp, overrides)
  remat_given = any(item.split("=", 1)[0].strip() == REMAT_KEY for item in overrides)
  return ([] if fsdp is None else [f"--config.{FSDP_KEY}={fsdp}"]) + (
      [f"--config.{REMAT_KEY}=True"] if value and value > 1 and not remat_given else [])


def launched_overrides(fsdp: int | None, overrides: Sequence[str]) -> list[str]:
  """The `key=value` overrides the train command gets: --set's, then --fsdp's
  (`fsdp_flags`), so a preflight check sees the config the workers run."""
  return [*overrides, *(flag.removeprefix("--config.") for flag in fsdp_flags(fsdp, overrides))]


def tpu_devices(accelerator_type: str) -> tuple[int, int] | None:
  """(JAX devices of the slice, devices per worker host) of a TPU VM accelerator type;
  None for a type not covered here (then nothing is checked).

  The rule implemented (one JAX device per chip on these families):
    v4-N, v5p-N: N counts TensorCores, 2 per chip, so N/2 chips (v4-32: 16 chips);
      4 chips per worker host (v4-8 and v5p-8 are one host).
    v5litepod-N, v6e-N: N counts chips. Slices of 1, 4 or 8 chips are one host
      (v5litepod-8, v6e-8: 8 chips on one worker); larger slices have 4 chips per host.
  Anything else (v2, v3 with one device per TensorCore, unknown names or sizes) is not
  guessed.
  """
  family, _, count = accelerator_type.partition("-")
  if not count.isdigit():
    return None
  n = int(count)
  if family in ("v4", "v5p"):
    if n >= 8 and n % 8 == 0:
      return n // 2, 4
    return None
  if family in ("v5litepod", "v6e"):
    if n in (1, 4, 8):
      return n, n
    if n > 8 and n % 4 == 0:
      return n, 4
  return None


def check_fsdp_within_host(fsdp: int, given: str, per_host: int, per_host_desc: str,
                           host: str = "host"):
  """An fsdp group must lie within one host: train.fsdp divides the devices per host.

  `given` and `per_host_desc` name the flags in the message, e.g. "--fsdp 3" and
  "--gpus-per-node 8".
  """
  if per_host % fsdp:
    divisors = [str(d) for d in range(1, per_host + 1) if per_host % d == 0]
    choices = ", ".join(divisors[:-1]) + " or " + divisors[-1] if len(divisors) > 1 \
        else divisors[0]
    raise ValueError(f"{given} does not divide {per_host_desc}: an fsdp group must lie "
                     f"within one {host}; use --fsdp {choices}")


def mesh_line(fsdp: int | None, devices: int | None, where: str = "") -> str:
  """The `# mesh: ...` comment of a dry run (empty when there is nothing to say).

  `devices` is the total device count when the launcher knows it; `where` describes
  them (e.g. "v4-32, 4 per worker").
  """
  about = f"{devices} devices" + (f" of {where}" if where else "")
  if fsdp is None:
    return f"# mesh: data x fsdp over {about}; {FSDP_KEY} from the config" if devices \
        else ""
  if devices is None:
    return f"# mesh: fsdp={fsdp}, data = devices / {fsdp}"
  return f"# mesh: data={devices // fsdp} x fsdp={fsdp} ({about}; {FSDP_KEY}={fsdp})"


def train_mesh_line(fsdp: int | None, accelerator_type: str | None) -> str:
  """The mesh comment of `train`: from the accelerator type when it is known."""
  known = tpu_devices(accelerator_type) if accelerator_type else None
  if known is None:
    return mesh_line(fsdp, None)
  devices, per_host = known
  return mesh_line(fsdp, devices, f"{accelerator_type}, {per_host} per worker")


def train_command(target: Target, config: str, workdir: str,
                  overrides: Sequence[str] = (), allow_local_workdir: bool = False,
                  fsdp: int | None = None, accelerator_type: str | None = None
                  ) -> list[Command]:
  """Starts `bihier_jax.train` on every worker at once, detached, logging to a file.

  All hosts must start together: `jax.distributed.initialize()` (enabled by
  `train.multi_host=True`; on a single host it finds one process) waits for every
  process of the slice.

  `fsdp` (--fsdp) becomes `--config.train.fsdp=N` (and model.esm.remat=True above 1,
  see `fsdp_flags`). With `accelerator_type` known to
  `tpu_devices`, train.fsdp (from --fsdp or --set) must divide the devices per worker;
  without it nothing about the device count is assumed.
  """
  value, given = fsdp_from_flags(fsdp, overrides)
  known = tpu_devices(accelerator_type) if accelerator_type else None
  if value is not None and known is not None:
    check_fsdp_within_host(
        value, given, known[1],
        f"the {known[1]} devices per worker of --accelerator-type {accelerator_type}",
        host="worker")
  if not workdir.startswith("gs://") and not allow_local_workdir:
    raise ValueError(
        f"workdir {workdir!r}: TPU workers share no disk; use a gs:// bucket "
        "(or --allow-local-workdir for a single-host test)")
  argv = ["-m", "bihier_jax.train", f"--config={config}", f"--workdir={workdir}",
          "--config.train.multi_host=True", *fsdp_flags(fsdp, overrides),
          *config_override_flags(overrides)]
  # The interpreter path stays unquoted so the remote shell expands `~`.
  remote = (f"cd {REMOTE_DIR} && nohup {REMOTE_VENV}/bin/python {shlex.join(argv)} "
            f"> {REMOTE_LOG} 2>&1 < /dev/null &")
  return [ssh_all(target, remote)]


def logs_command(target: Target, worker: str = "0", follow: bool = True
                 ) -> list[Command]:
  """Streams the training log of one worker (worker 0 writes metrics and checkpoints)."""
  tail = f"tail -n 200 {'-F ' if follow else ''}{REMOTE_LOG}"
  return [ssh_all(target, tail, worker=worker)]


def status_commands(target: Target, queued: bool = False) -> list[Command]:
  if queued:
    return [_queued(target, "describe", target.name)]
  return [_tpu_vm(target, "describe", target.name)]


def stop_training_commands(target: Target) -> list[Command]:
  """Kills the training processes on every worker (the TPU stays up)."""
  # The bracket keeps pkill from matching the remote shell running this very line.
  return [ssh_all(target, "pkill -f '[b]ihier_jax.train' || true")]


def delete_commands(target: Target, queued: bool = False) -> list[Command]:
  """Deletes the TPU; with --queued the queued resource and (--force) its node."""
  if queued:
    return [_queued(target, "delete", target.name, "--force", "--quiet")]
  return [_tpu_vm(target, "delete", target.name, "--quiet")]


def format_commands(commands: Sequence[Command]) -> str:
  """One shell-quoted line per command, as `--dry-run` prints them."""
  return "\n".join(shlex.join(c) for c in commands)


def execute(commands: Sequence[Command], dry_run: bool) -> int:
  if dry_run:
    print(format_commands(commands))
    return 0
  for cmd in commands:
    print("+", shlex.join(cmd), flush=True)
    rc = subprocess.run(cmd, check=False).returncode
    if rc != 0:
      print(f"command failed with exit status {rc}: {shlex.join(cmd)}", file=sys.stderr)
      return rc
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m launch.tpu_vm", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="verb", required=True)

  def add(verb, help_text):
    p = sub.add_parser(verb, help=help_text)
    p.add_argument("--name", required=True, help="TPU node id")
    p.add_argument("--zone", required=True)
    p.add_argument("--project", default="")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    return p

  p = add("create", "create a TPU VM or pod slice")
  p.add_argument("--accelerator-type", default=DEFAULT_ACCELERATOR)
  p.add_argument("--version", default=DEFAULT_VERSION, help="TPU software version")
  p.add_argument("--spot", action="store_true", help="spot capacity (preemptible)")
  p.add_argument("--queued", action="store_true", help="use the queued-resources API")

  p = add("install", "copy this repository to every worker and pip install it")
  p.add_argument("--archive", default=LOCAL_ARCHIVE)
  p.add_argument("--ref", default="HEAD", help="git ref to ship")

  p = add("train", "start multi-host training on every worker")
  p.add_argument("--config", required=True, help="e.g. configs/react.py or ...:tiny")
  p.add_argument("--workdir", required=True, help="gs://bucket/path")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="config override, repeatable (becomes --config.KEY=VALUE)")
  p.add_argument("--allow-local-workdir", action="store_true")
  p.add_argument("--fsdp", type=int, default=None, metavar="N",
                 help="train.fsdp: devices per parameter-sharding group, within one "
                 "worker (default: the config's value); above 1 also sets "
                 "model.esm.remat=True")
  p.add_argument("--accelerator-type", default=None,
                 help="e.g. v4-32, as given to create: checks --fsdp against the "
                 "devices per worker and shows the mesh (optional, not guessed)")

  p = add("logs", "stream a worker's training log")
  p.add_argument("--worker", default="0")
  p.add_argument("--no-follow", action="store_true")

  p = add("status", "describe the TPU or queued resource")
  p.add_argument("--queued", action="store_true")

  add("stop", "kill training on every worker")

  p = add("delete", "delete the TPU (and its queued resource)")
  p.add_argument("--queued", action="store_true")
  return parser


def check_config(args: argparse.Namespace) -> None:
  """The train command's own config checks, here, before anything is printed or run
  (`launch.preflight`): with --accelerator-type, also the batch split over its devices.

  Raises:
    ValueError: the config would fail on every worker (one line).
  """
  from launch import preflight  # pylint: disable=g-import-not-at-top
  known = tpu_devices(args.accelerator_type) if args.accelerator_type else None
  preflight.check_train_config(
      args.config, launched_overrides(args.fsdp, args.set),
      devices=known[0] if known else None,
      devices_per_host=known[1] if known else None,
      local_paths="skip" if args.allow_local_workdir else "refuse")


def commands_from_args(args: argparse.Namespace) -> list[Command]:
  target = Target(args.name, args.zone, args.project)
  if args.verb == "create":
    return create_commands(target, args.accelerator_type, args.version, args.spot,
                           args.queued)
  if args.verb == "install":
    return install_commands(target, args.archive, args.ref)
  if args.verb == "train":
    commands = train_command(target, args.config, args.workdir, args.set,
                             args.allow_local_workdir, args.fsdp, args.accelerator_type)
    check_config(args)
    return commands
  if args.verb == "logs":
    return logs_command(target, args.worker, follow=not args.no_follow)
  if args.verb == "status":
    return status_commands(target, args.queued)
  if args.verb == "stop":
    return stop_training_commands(target)
  if args.verb == "delete":
    return delete_commands(target, args.queued)
  raise ValueError(f"unknown subcommand {args.verb!r}")


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    commands = commands_from_args(args)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.verb == "train":
    fsdp, _ = fsdp_from_flags(args.fsdp, args.set)
    note = train_mesh_line(fsdp, args.accelerator_type)
    if note:
      print(note, flush=True)  # a comment: the dry-run output stays copy-pastable
  return execute(commands, args.dry_run)


if __name__ == "__main__":
  sys.exit(main())
