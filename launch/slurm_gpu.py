"""Multi-node GPU training under SLURM, on the same entry points as the TPU launcher.

  python -m launch.slurm_gpu --config configs/react.py --workdir /shared/runs/react1 \
      --nodes 2 --gpus-per-node 8 --partition gpu --venv /shared/venvs/bihier --dry-run

Writes an sbatch script that starts one task per GPU with `srun` (GPUs requested per
node, bound per none: `jax.distributed.initialize()` gives task k of a node its GPU k)
and submits it; `--dry-run` prints both. `--fsdp N` (N divides --gpus-per-node) sets
train.fsdp and model.esm.remat. Why, and the mesh line: launch/README.md, "SLURM GPU
cluster" and "Parameter sharding".
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import subprocess
import sys
from typing import Sequence

from launch import tpu_vm


@dataclasses.dataclass(frozen=True)
class SlurmJob:
  """Resources and program of one training job."""
  config: str
  workdir: str  # shared filesystem path or gs://; every task writes through process 0
  nodes: int = 1
  gpus_per_node: int = 8
  cpus_per_task: int = 8
  time: str = "24:00:00"
  job_name: str = "bihier"
  partition: str = ""
  account: str = ""
  venv: str = ""  # virtual environment to activate on every node
  overrides: tuple[str, ...] = ()  # key=value config overrides
  evaluate: bool = False  # run bihier_jax.eval on one GPU after training
  fsdp: int | None = None  # train.fsdp (--fsdp); None: the config's value

  @property
  def num_tasks(self) -> int:
    return self.nodes * self.gpus_per_node


def train_argv(job: SlurmJob) -> list[str]:
  """The program every task runs (inside srun)."""
  return ["python", "-m", "bihier_jax.train", f"--config={job.config}",
          f"--workdir={job.workdir}", "--config.train.multi_host=True",
          *tpu_vm.fsdp_flags(job.fsdp, job.overrides), *tpu_vm.config_override_flags(job.overrides)]


def eval_argv(job: SlurmJob) -> list[str]:
  # Same train.fsdp as training: eval builds its mesh from it to restore the checkpoint.
  return ["python", "-m", "bihier_jax.eval", f"--config={job.config}",
          f"--workdir={job.workdir}", *tpu_vm.fsdp_flags(job.fsdp, job.overrides),
          *tpu_vm.config_override_flags(job.overrides)]


def sbatch_script(job: SlurmJob) -> str:
  """The batch script text."""
  if job.nodes < 1 or job.gpus_per_node < 1:
    raise ValueError(f"nodes={job.nodes}, gpus_per_node={job.gpus_per_node}: need >= 1")
  # train.fsdp from --fsdp or --set train.fsdp=M; its groups must not span nodes.
  fsdp, given = tpu_vm.fsdp_from_flags(job.fsdp, job.overrides)
  if fsdp is not None:
    tpu_vm.check_fsdp_within_host(fsdp, given, job.gpus_per_node,
                                  f"--gpus-per-node {job.gpus_per_node}", host="node")
  lines = [
      "#!/bin/bash",
      f"#SBATCH --job-name={job.job_name}",
      f"#SBATCH --nodes={job.nodes}",
      f"#SBATCH --ntasks-per-node={job.gpus_per_node}",
      f"#SBATCH --gpus-per-node={job.gpus_per_node}",
      f"#SBATCH --cpus-per-task={job.cpus_per_task}",
      f"#SBATCH --time={job.time}",
      "#SBATCH --output=%x-%j.out",
  ]
  if job.partition:
    lines.append(f"#SBATCH --partition={job.partition}")
  if job.account:
    lines.append(f"#SBATCH --account={job.account}")
  lines += [
      "",
      "set -euo pipefail",
  ]
  if job.venv:
    lines.append(f"source {shlex.quote(job.venv)}/bin/activate")
  lines += [
      "# One JAX process per GPU; jax.distributed.initialize() reads the SLURM variables.",
      "export TF_CPP_MIN_LOG_LEVEL=2",
      tpu_vm.mesh_line(fsdp, job.num_tasks),
      f"srun --ntasks={job.num_tasks} --ntasks-per-node={job.gpus_per_node} "
      f"--kill-on-bad-exit=1 {shlex.join(train_argv(job))}",
  ]
  if job.evaluate:
    lines.append(f"srun --nodes=1 --ntasks=1 {shlex.join(eval_argv(job))}")
  return "\n".join(lines) + "\n"


def submit_command(script_path: str) -> list[str]:
  return ["sbatch", script_path]


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m launch.slurm_gpu", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True)
  p.add_argument("--workdir", required=True)
  p.add_argument("--nodes", type=int, default=1)
  p.add_argument("--gpus-per-node", type=int, default=8)
  p.add_argument("--cpus-per-task", type=int, default=8)
  p.add_argument("--time", default="24:00:00")
  p.add_argument("--job-name", default="bihier")
  p.add_argument("--partition", default="")
  p.add_argument("--account", default="")
  p.add_argument("--venv", default="")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  p.add_argument("--fsdp", type=int, default=None, metavar="N",
                 help="train.fsdp: GPUs per parameter-sharding group, must divide "
                 "--gpus-per-node (default: the config's value); above 1 also sets "
                 "model.esm.remat=True")
  p.add_argument("--eval", action="store_true", help="evaluate after training")
  p.add_argument("--script", default="", help="where to write the script "
                 "(default: <job-name>.sbatch in the current directory)")
  p.add_argument("--dry-run", action="store_true",
                 help="print the script and the sbatch command only")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  job = SlurmJob(config=args.config, workdir=args.workdir, nodes=args.nodes,
                 gpus_per_node=args.gpus_per_node, cpus_per_task=args.cpus_per_task,
                 time=args.time, job_name=args.job_name, partition=args.partition,
                 account=args.account, venv=args.venv, overrides=tuple(args.set),
                 evaluate=args.eval, fsdp=args.fsdp)
  try:
    script = sbatch_script(job)
    from launch import preflight  # pylint: disable=g-import-not-at-top
    # The train command's checks, here: the nodes share the file system with this one.
    preflight.check_train_config(
        job.config, tpu_vm.launched_overrides(job.fsdp, job.overrides),
        devices=job.num_tasks, devices_per_host=job.gpus_per_node, local_paths="check")
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  path = args.script or f"{job.job_name}.sbatch"
  if args.dry_run:
    print(f"# --- {path} ---")
    print(script, end="")
    print(f"# --- submit ---\n{shlex.join(submit_command(path))}")
    return 0
  if os.path.dirname(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(script)
  print(f"wrote {path}", flush=True)
  return subprocess.run(submit_command(path), check=False).returncode


if __name__ == "__main__":
  sys.exit(main())
