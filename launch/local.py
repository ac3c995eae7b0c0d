"""Several JAX processes of one command on this machine: a multi-host job in rehearsal.

  python -m launch.local --processes 2 --devices-per-process 4 -- \
      python -m bihier_jax.train --config configs/demo.py:tiny --workdir /tmp/mh \
      --config.train.batch_size=8 --config.train.multi_host=True

Each process gets the SLURM step variables that `jax.distributed.initialize()` reads
and a coordinator on 127.0.0.1 (no protocol of its own); `--devices-per-process D`
simulates D CPU devices per process with gloo collectives. A failing process stops the
others and its status is the command's; SIGTERM or Ctrl-C reaches every process. Logs,
signals and statuses: docs/parallelism.md, "Multi-host"; launch/README.md.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Sequence

EXIT_USER_ERROR = 2


def free_port() -> int:
  """A TCP port nothing listens on now (the OS picks it)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return int(s.getsockname()[1])


def process_env(base: dict[str, str], rank: int, processes: int, port: int,
                devices_per_process: int | None) -> dict[str, str]:
  """The environment of process `rank`: SLURM's step variables, the coordinator and,
  with simulated devices, their count."""
  env = dict(base)
  env.update({
      "SLURM_JOB_ID": str(port),  # any job id; the address below names the port
      "SLURM_STEP_NODELIST": "localhost",
      "SLURM_STEP_NUM_NODES": "1",
      "SLURM_NTASKS": str(processes),
      "SLURM_PROCID": str(rank),
      "SLURM_LOCALID": str(rank),
      "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
  })
  if devices_per_process:
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                   env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = (f"{flags} --xla_force_host_platform_device_count="
                        f"{int(devices_per_process)}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
  return env


def exit_status(returncode: int) -> int:
  """A child's status as a shell shows it: 128 + N for a process killed by signal N."""
  return 128 - returncode if returncode < 0 else returncode


def _describe(returncode: int) -> str:
  if returncode < 0:
    try:
      name = signal.Signals(-returncode).name
    except ValueError:
      name = f"signal {-returncode}"
    return f"was killed by {name} (status {exit_status(returncode)})"
  return f"exited with status {returncode}"


def _pump(stream, log_path: str, prefix: str, console) -> None:
  """Copies a child's output to its log file and, prefixed, to the console."""
  with open(log_path, "ab") as log:
    for line in iter(stream.readline, b""):
      log.write(line)
      log.flush()
      console.write(prefix + line.decode(errors="replace"))
      console.flush()
  stream.close()


def run(command: Sequence[str], processes: int, *, devices_per_process: int | None = None,
        port: int | None = None, log_dir: str | None = None, grace: float = 10.0,
        console=None) -> int:
  """Runs `processes` copies of `command` as one job; returns the job's exit status."""
  console = console or sys.stdout
  port = port or free_port()
  log_dir = log_dir or tempfile.mkdtemp(prefix="launch-local-")
  os.makedirs(log_dir, exist_ok=True)
  console.write(f"launch.local: {processes} processes, coordinator 127.0.0.1:{port}, "
                f"logs in {log_dir}/process<k>.log\n")
  console.flush()
  children, pumps, logs = [], [], []
  for rank in range(processes):
    logs.append(os.path.join(log_dir, f"process{rank}.log"))
    child = subprocess.Popen(
        list(command), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=process_env(dict(os.environ), rank, processes, port, devices_per_process))
    children.append(child)
    pump = threading.Thread(target=_pump, args=(child.stdout, logs[-1], f"[{rank}] ",
                                                console), daemon=True)
    pump.start()
    pumps.append(pump)

  def forward(signum, frame):
    del frame
    for child in children:
      if child.poll() is None:
        child.send_signal(signum)

  previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
  status = 0
  try:
    running = set(range(processes))
    while running:
      for rank in sorted(running):
        code = children[rank].poll()
        if code is None:
          continue
        running.discard(rank)
        if code != 0 and status == 0:
          status = exit_status(code)
          console.write(f"launch.local: process {rank} {_describe(code)} (log: "
                        f"{logs[rank]}); stopping the other processes\n")
          console.flush()
          _stop(children, grace)
      time.sleep(0.1)
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  for pump in pumps:
    pump.join(timeout=5)
  return status


def _stop(children, grace: float) -> None:
  """SIGTERM to the children still running, SIGKILL to those left after `grace` s."""
  for child in children:
    if child.poll() is None:
      child.terminate()
  deadline = time.time() + grace
  for child in children:
    try:
      child.wait(timeout=max(deadline - time.time(), 0.0))
    except subprocess.TimeoutExpired:
      child.kill()
      child.wait()


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m launch.local", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--processes", type=int, required=True, help="JAX processes (hosts)")
  p.add_argument("--devices-per-process", type=int, default=None,
                 help="simulated CPU devices per process (default: the machine's own)")
  p.add_argument("--port", type=int, default=None,
                 help="coordinator port on 127.0.0.1 (default: a free one)")
  p.add_argument("--log-dir", default=None,
                 help="folder of the per-process logs (default: a new temporary one)")
  p.add_argument("--grace", type=float, default=10.0,
                 help="seconds between SIGTERM and SIGKILL when stopping the others")
  p.add_argument("command", nargs=argparse.REMAINDER,
                 help="-- then the command every process runs")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  command = list(args.command)
  if command and command[0] == "--":
    command = command[1:]
  problem = None
  if not command:
    problem = "no command: give it after --, e.g. -- python -m bihier_jax.train ..."
  elif args.processes < 1:
    problem = f"--processes {args.processes}: need at least 1"
  elif args.devices_per_process is not None and args.devices_per_process < 1:
    problem = f"--devices-per-process {args.devices_per_process}: need at least 1"
  if problem:
    print(f"error: {problem}", file=sys.stderr)
    return EXIT_USER_ERROR
  return run(command, args.processes, devices_per_process=args.devices_per_process,
             port=args.port, log_dir=args.log_dir, grace=args.grace)


if __name__ == "__main__":
  sys.exit(main())
