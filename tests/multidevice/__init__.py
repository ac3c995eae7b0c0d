"""Checks on 8 simulated CPU devices, each a module run in a fresh interpreter: XLA reads
--xla_force_host_platform_device_count when jax starts, so it cannot be set in pytest's.

  python -m tests.multidevice.parallel_equivalence   # from the repository root
"""

import os
import subprocess
import sys

from tests import paths


def run(module: str, timeout: int) -> None:
  """Runs tests.multidevice.<module> from the repository root; it must exit 0 and print
  OK."""
  env = dict(os.environ, PYTHONPATH=paths.REPO, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", f"tests.multidevice.{module}"],
                        cwd=paths.REPO, env=env, capture_output=True, text=True,
                        timeout=timeout)
  assert proc.returncode == 0 and "OK" in proc.stdout, (
      proc.stdout[-3000:] + proc.stderr[-5000:])
