"""FSDP on 2 simulated devices: the remat policy saves no gathered weight, only each
device's pieces (run by tests/models/test_remat.py; prints OK)."""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import jax  # noqa: E402

from bihier_jax.models import esm2, fsdp  # noqa: E402
from bihier_jax.training import mesh as mesh_lib  # noqa: E402
from tests.models import test_remat  # noqa: E402


# fc1 [3, 32, 128] and fc2 are split over the 2 devices, gathered layer by layer.
cfg = esm2.ESM2Config(num_layers=3, embed_dim=32, num_heads=4, mlm_head=False)
params = esm2.param_shapes(cfg)
mesh = mesh_lib.make_mesh(jax.devices(), 2)
specs = mesh_lib.param_specs({"esm": params}, mesh)["esm"]
assert specs["layers"]["fc1"]["kernel"] == jax.P(None, None, "fsdp"), specs
model, axes = esm2.ESM2(cfg), mesh_lib.batch_axes(mesh)

def body(p, tokens):
  with fsdp.gathering(2):
    out = model.apply({"params": p}, tokens, output_hidden_states=False)
  return jax.lax.psum(out.last_hidden_state.sum(), axes)

def loss(p):
  return jax.shard_map(body, mesh=mesh, in_specs=(specs, jax.P(axes)),
                       out_specs=jax.P(), check_vma=True)(p, test_remat.TOKENS)

rows = test_remat.saved_residuals(loss, params)
matrices = test_remat._matrices(cfg)
matrices |= {(32, 48), (32, 16), (32, 64), (64, 32)}  # the pieces of each device
copies = test_remat.weight_copies(rows, matrices)
assert not copies, copies
print("OK")
