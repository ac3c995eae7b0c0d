"""Data parallelism on 8 simulated CPU devices gives the 1-device loss, gradients and
matmul FLOPs (run by tests/training/test_parallel.py; prints OK)."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")

# pylint: disable=wrong-import-position
import jax  # noqa: E402
import numpy as np  # noqa: E402

from bihier_jax import testing  # noqa: E402
from bihier_jax.common import flops  # noqa: E402
from bihier_jax.data import layout  # noqa: E402
from bihier_jax.data.batch import PaddingBudget  # noqa: E402
from bihier_jax import models  # noqa: E402
from bihier_jax.training import device_batches, mesh as mesh_lib, steps  # noqa: E402
from configs import demo  # noqa: E402
# pylint: enable=wrong-import-position


def main():
  assert jax.device_count() == 8, jax.devices()
  config = demo.get_config("tiny")
  budget = PaddingBudget(n_node=48, n_edge=700, n_graph=3, n_row=2, row_length=26)
  subs = [layout.collate(
      [testing.random_example(10 + (3 * d) % 11, seed=d),
       testing.random_example(8 + d, seed=100 + d)], budget) for d in range(8)]
  # One sub-batch without labels: it must weigh nothing, on either mesh.
  subs[5] = subs[5].replace(node_label_mask=np.zeros_like(subs[5].node_label_mask))
  stacked = device_batches.stack(subs)
  model = models.build_model(config)
  params = jax.device_get(jax.jit(lambda k, b: model.init(k, b)["params"])(
      jax.random.key(0), subs[0]))
  rng = jax.random.key_data(jax.random.key(1))

  def step(devices):
    mesh = mesh_lib.make_mesh(devices)
    batch = mesh_lib.put_global(stacked, mesh)
    assert len(batch.node_mask.sharding.device_set) == len(devices)
    fn = jax.jit(lambda p, b: steps.loss_and_grads(
        p, b, rng, 3, model=model, task=config.task, mesh=mesh),
        in_shardings=(mesh_lib.replicated(mesh), mesh_lib.batch_sharding(mesh)))
    return fn, batch

  # Each mesh's program is traced once: counted, then run.
  eight, one = step(jax.devices()), step(jax.devices()[:1])

  def run(fn, batch):
    (loss, _), grads = fn(params, batch)
    return jax.device_get((loss, grads))

  # The same 8 sub-batches: a shard_map body on each of 8 devices, or a loop of 8 on one
  # device. Equal up to products of parameters alone (ProNet's fused edge kernels),
  # which JAX hoists out of the loop but every device computes: 0.24% here. A missing
  # x8 for the devices or for the loop would be a factor of 8.
  def count(fn, batch):
    return flops.matmul_flops(fn, params, batch)

  flops8, flops1 = count(*eight), count(*one)
  print("matmul flops", flops8, flops1)
  assert flops1 > 0 and 0 <= flops8 - flops1 < 0.01 * flops1

  l8, g8 = run(*eight)
  l1, g1 = run(*one)
  print("losses", l8, l1)
  np.testing.assert_allclose(l8, l1, rtol=0, atol=1e-5)
  flat8 = jax.tree_util.tree_leaves(g8)
  flat1 = jax.tree_util.tree_leaves(g1)
  assert len(flat8) == len(flat1) > 10
  worst = max(float(np.max(np.abs(a - b))) for a, b in zip(flat8, flat1))
  print("max |grad8 - grad1|", worst)
  assert worst <= 1e-5, worst
  assert sum(float(np.max(np.abs(b))) > 1e-4 for b in flat1) > len(flat1) // 2
  print("OK")


if __name__ == "__main__":
  main()
