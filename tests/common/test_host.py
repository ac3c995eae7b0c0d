"""Allocator settings: applied on glibc, opt-out honoured, page faults per step gone."""

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

import conftest
from tests.paths import REPO


# A ProNet-like edge convolution, forward + backward: its temporaries (~35 MB) exceed
# glibc's largest mmap threshold, so with default settings every call maps them afresh.
_PROBE = textwrap.dedent("""
    import json, resource, sys
    from bihier_jax.common import host
    applied = host.tune_malloc()
    import jax, jax.numpy as jnp, numpy as np
    n, e, h = 1024, 17408, 128
    rng = np.random.default_rng(0)
    recv = jnp.asarray(np.sort(rng.integers(0, n, e)).astype(np.int32))
    send = jnp.asarray(rng.integers(0, n, e).astype(np.int32))
    x = jnp.asarray(rng.normal(size=(n, h)), jnp.float32)
    f = jnp.asarray(rng.normal(size=(e, 24)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(24, h)), jnp.float32)
    def conv(x, k):
      return (jax.ops.segment_sum((f @ k) * x[send], recv, n) ** 2).sum()
    step = jax.jit(jax.grad(conv, argnums=(0, 1)))
    for _ in range(3):
      jax.block_until_ready(step(x, k))
    faults = []
    for _ in range(9):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      jax.block_until_ready(step(x, k))
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"applied": applied, "faults_per_call": sorted(faults)[4]}))
""")


def _probe(tune: bool) -> dict:
  # XLA's default emitters, as in real runs: with the suite's fast-compile flags
  # (conftest) this program's temporaries stay under glibc's mmap threshold.
  xla_flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
               if f not in conftest.FAST_COMPILE_XLA_FLAGS]
  env = dict(os.environ, BIHIER_TUNE_MALLOC="1" if tune else "0", JAX_PLATFORMS="cpu",
             XLA_FLAGS=" ".join(xla_flags),
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True,
                       text=True, check=True, timeout=300).stdout
  return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="the settings are glibc's")
def test_tuned_allocator_stops_per_step_page_faults():
  default = _probe(tune=False)
  tuned = _probe(tune=True)
  assert default["applied"] is False  # BIHIER_TUNE_MALLOC=0 is honoured
  assert tuned["applied"] is True
  # Median over calls. Default glibc: the temporaries are mapped and faulted in on every
  # call (~8,700 pages measured); tuned: the heap keeps them, so a typical call faults
  # nothing in (the heap still grows now and then while it settles).
  assert default["faults_per_call"] > 1000, default
  assert tuned["faults_per_call"] < 100, tuned
