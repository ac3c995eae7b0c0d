"""splash and flash_gpu inside the real steps on 2 simulated devices equal exact attention
(run by tests/training/test_pallas_steps.py; prints OK)."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=2")

import jax  # noqa: E402

from bihier_jax.training import mesh as mesh_lib  # noqa: E402
from tests.training import test_pallas_steps as t  # noqa: E402


assert jax.device_count() == 2
batch = t.stacked_batch(2, 2)
params = t.initial_params(batch)
mesh = mesh_lib.make_mesh(jax.devices())
assert mesh.devices.size == 2
want = t.run_sequence("exact", params, batch, None, mesh)
for kind in t.KINDS:
  t.assert_equal_runs(t.run_sequence(kind, params, batch, None, mesh), want)
  print(kind, "equal")
print("OK")
