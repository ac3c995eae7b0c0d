"""Parameter sharding (train.fsdp) on 8 simulated CPU devices: the 1-device losses and
updates with fsdp 4 and 8, checkpoints restored onto other meshes, bfloat16 gradients
against plain data parallelism, and the training loop end to end (run by
tests/training/test_fsdp.py; prints OK)."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")

# pylint: disable=wrong-import-position
import functools  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bihier_jax import testing  # noqa: E402
from bihier_jax.data import layout  # noqa: E402
from bihier_jax.data.batch import PaddingBudget  # noqa: E402
from bihier_jax import models  # noqa: E402
from bihier_jax.training import checkpointing, device_batches, mesh as mesh_lib, optim, steps, train_lib, train_state  # noqa: E402
from configs import demo  # noqa: E402
# pylint: enable=wrong-import-position

BUDGET = PaddingBudget(n_node=48, n_edge=700, n_graph=3, n_row=2, row_length=26)
KERNEL = ("esm", "layers", "fc1", "kernel")  # [4, 64, 256], split on its last axis


def batch(step):  # 8 sub-batches of 2 proteins, different at every step
  return device_batches.stack([layout.collate(
      [testing.random_example(10 + (3 * d + step) % 11, seed=d + 10 * step),
       testing.random_example(8 + d, seed=100 + d + 10 * step)], BUDGET)
      for d in range(8)])


def leaf(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def close(a, b, what):
  # The global fusion's key bias has an exactly zero gradient (softmax ignores a
  # constant per query); Adam turns its float32 noise into +-lr steps, which differ
  # with the summation order. Every other parameter is compared.
  worst = 0.0
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a),
                          jax.tree_util.tree_leaves(b)):
    name = jax.tree_util.keystr(path)
    if "['key']['bias']" not in name:
      worst = max(worst, float(np.max(np.abs(np.asarray(x) - np.asarray(y)))))
  print(what, "max |difference|", worst)
  assert worst <= 1e-5, (what, worst)


class Steps:
  """Three training steps of the tiny demo model (dropout off, constant rate)."""

  def __init__(self):
    self.config = demo.get_config("tiny")
    config = self.config
    config.model.gnn.dropout = config.model.fusion.dropout = 0.0
    config.model.head.dropout = 0.0
    config.optim.warmup_steps, config.optim.schedule = 0, "constant"
    self.batches = [batch(s) for s in range(3)]
    self.sample = layout.collate([testing.random_example(10, seed=0)], BUDGET)
    self.model = models.build_model(config)
    self._fns = {}  # (mesh, tx) -> its jitted step: a run continued is not traced again

  def run(self, mesh, state=None, tx=None, first=0, last=3):
    if state is None:
      state, tx = train_state.create_train_state(self.config, self.model, self.sample, mesh,
                                           load_esm=False)
    if (mesh, tx) not in self._fns:
      self._fns[mesh, tx] = steps.jit_train_step(self.model, tx, self.config.task, mesh,
                                                 state)
    fn = self._fns[mesh, tx]
    losses = []
    for b in self.batches[first:last]:
      state, metrics = fn(state, mesh_lib.put_global(b, mesh))
      losses.append(float(metrics["loss"]))
    return state, tx, losses


def fsdp_matches_one_device(s: Steps):
  """fsdp 4 and 8 against 1 device; returns (1-device state, losses, fsdp=4 workdir)."""
  one, _, loss_one = s.run(mesh_lib.make_mesh(jax.devices()[:1]))
  ref_params = jax.device_get(one.params)
  print("1 device", loss_one)
  results = {}
  for size in (4, 8):
    mesh = mesh_lib.make_mesh(jax.devices(), size)
    state, tx, losses = s.run(mesh, last=2)
    kernel = leaf(state.params, KERNEL)
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, None, "fsdp")
    assert kernel.addressable_shards[0].data.shape == (4, 64, 256 // size)
    mu = [x for p, x in jax.tree_util.tree_leaves_with_path(state.opt_state)
          if jax.tree_util.keystr(p).endswith("['layers']['fc1']['kernel']")]
    assert mu and all(m.addressable_shards[0].data.shape == (4, 64, 256 // size)
                      for m in mu)
    if size == 4:  # saved after 2 steps, for the restores below
      workdir = tempfile.mkdtemp()
      with checkpointing.Checkpointer(workdir) as ckpt:
        ckpt.save(2, state, {"consumed": 2}, force=True)
        ckpt.wait()
    state, _, more = s.run(mesh, state, tx, first=2)
    results[size] = losses + more
    print("fsdp", size, results[size])
    np.testing.assert_allclose(results[size], loss_one, rtol=0, atol=1e-5)
    close(jax.device_get(state.params), ref_params, f"fsdp={size} vs 1 device")
  return one, results[4], workdir


def restores_across_meshes(s: Steps, ref_params, losses4, workdir):
  # The fsdp=4 checkpoint of step 2 onto other meshes: 8 devices with fsdp=8, and 4
  # devices with fsdp=2 (two sub-batches per device), then step 3 as before.
  for devices, size in ((jax.devices(), 8), (jax.devices()[:4], 2)):
    mesh = mesh_lib.make_mesh(devices, size)
    abstract = train_state.abstract_train_state(s.config, s.model, s.sample, mesh)
    with checkpointing.Checkpointer(workdir, read_only=True) as ckpt:
      state, _, step = ckpt.restore("latest", abstract)
    assert step == 2 and int(state.step) == 2
    kernel = leaf(state.params, KERNEL)
    assert kernel.addressable_shards[0].data.shape == (4, 64, 256 // size)
    assert len(kernel.sharding.device_set) == len(devices)
    tx = optim.make_optimizer(s.config)
    state, _, losses = s.run(mesh, state, tx, first=2)
    print(len(devices), "devices, fsdp", size, "after restore", losses)
    np.testing.assert_allclose(losses, losses4[2:], rtol=0, atol=1e-5)
    close(jax.device_get(state.params), ref_params, f"restored on {size}")


def bf16_gradients_match_data_parallel(s: Steps, one):
  # bfloat16: FSDP reduce-scatters each layer's gradient in float32 (fsdp.gather's
  # VJP), so its gradients equal plain data parallelism's on the same 8 devices up to
  # float32 summation order; summed in bf16 they differed by ~2e-3 of the largest entry.
  ref_params = jax.device_get(one.params)
  bf16_config = s.config.copy_and_resolve_references()
  bf16_config.model.dtype = "bfloat16"
  bf16_model = models.build_model(bf16_config)
  grads = {}
  for size in (1, 4):
    mesh = mesh_lib.make_mesh(jax.devices(), size)
    params = jax.device_put(ref_params, mesh_lib.state_shardings(ref_params, mesh))
    fn = jax.jit(functools.partial(steps.loss_and_grads, model=bf16_model,
                                   task=s.config.task, mesh=mesh))
    _, grads[size] = jax.device_get(fn(params, mesh_lib.put_global(s.batches[0], mesh),
                                       one.rng, one.step))
  worst = 0.0
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads[4]),
                          jax.tree_util.tree_leaves(grads[1])):
    if "['esm']['layers']" in jax.tree_util.keystr(path):
      worst = max(worst, float(np.max(np.abs(a - b)) / np.max(np.abs(b))))
  print("bf16 gradients, fsdp=4 vs data parallel: max |difference| / max", worst)
  assert worst <= 1e-5, worst


def training_loop_end_to_end():
  # The training loop end to end with fsdp=4: periodic evaluation on the per-host eval
  # mesh, sharded checkpoints, the final restore of the selected one; then a resumed
  # run continues from its checkpoint.
  run_config = demo.get_config("tiny")
  run_config.task.name = "synthetic"
  run_config.train.batch_size, run_config.train.fsdp = 8, 4
  run_config.train.num_steps, run_config.train.eval_every = 3, 2
  run_config.train.checkpoint_every = 2
  workdir = tempfile.mkdtemp()
  results = train_lib.train_and_evaluate(run_config, workdir, dataset_fn=testing.synthetic_dataset(BUDGET, eval_batches=8))
  print("end to end", results)
  assert np.isfinite(results["test"]["accuracy"]), results
  run_config.train.num_steps = 4
  resumed = train_lib.train_and_evaluate(run_config, workdir, dataset_fn=testing.synthetic_dataset(BUDGET, eval_batches=8))
  assert np.isfinite(resumed["test"]["loss"]), resumed


def main():
  assert jax.device_count() == 8, jax.devices()
  s = Steps()
  one, losses4, workdir = fsdp_matches_one_device(s)
  restores_across_meshes(s, jax.device_get(one.params), losses4, workdir)
  bf16_gradients_match_data_parallel(s, one)
  training_loop_end_to_end()
  print("OK")


if __name__ == "__main__":
  main()
