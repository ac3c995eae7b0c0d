"""Parameter sharding over the 'fsdp' mesh axis (train.fsdp): layout rules, and on 8
simulated CPU devices the same losses and updates as 1 device, and checkpoints that
restore onto other meshes.

The multi-device checks run in one subprocess (XLA_FLAGS must be set before jax is
imported): four compiled steps (1 device; 8 devices with fsdp 4 and 8; 4 devices with
fsdp 2), bfloat16 gradients with fsdp 4 against plain data parallelism, and a short
training run with fsdp=4 (train, evaluate, resume), about 2.5 min on an idle 2-core
machine.
"""

import os
import sys
import textwrap

import jax
import numpy as np
import optax

from bihier_jax.data import input_pipeline
from bihier_jax import testing
from bihier_jax.models import fsdp
from bihier_jax.training import mesh as mesh_lib
from bihier_jax import models
from bihier_jax.training import steps
from bihier_jax.training import train_state
from tests.training import test_parallel

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_XLA_FLAGS_BEFORE = os.environ.get("XLA_FLAGS", "")


def test_shard_dim_splits_layer_matrices_only():
  # [S, D, 3D]: the largest divisible dimension after the layer axis.
  assert fsdp.shard_dim((6, 320, 960), 8) == 2
  assert fsdp.shard_dim((6, 1280, 320), 8) == 1
  assert fsdp.shard_dim((6, 64, 64), 4) == 2  # a tie: the last one
  # Never the layer axis, never a per-layer vector (LayerNorm, bias), never tiny ones.
  assert fsdp.shard_dim((8, 320), 8) is None
  assert fsdp.shard_dim((64, 40, 40), 2) == 2  # not the layer axis, though largest
  assert fsdp.shard_dim((4, 16, 16), 2) is None  # 256 entries per layer
  assert fsdp.shard_dim((6, 320, 960), 1) is None
  assert fsdp.shard_dim((6, 330, 330), 4) is None  # nothing divisible
  assert fsdp.local_shape((6, 320, 960), 8) == (6, 320, 120)
  assert fsdp.local_shape((8, 320), 8) == (8, 320)


def _tiny_model(trainable="finetune"):
  from configs import demo  # pylint: disable=g-import-not-at-top
  config = demo.get_config("tiny")
  config.model.esm.trainable = trainable
  config.model.esm.last_n = 1
  model = models.build_model(config)
  batch = input_pipeline.collate([testing.random_example(10, seed=0)],
                                 input_pipeline.budget_for(
                                     [testing.random_example(10, seed=0)]))
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), batch)["params"])
  return config, model, params


def _specs_by_path(tree, mesh):
  return {jax.tree_util.keystr(p): s for p, s in
          jax.tree_util.tree_leaves_with_path(mesh_lib.param_specs(tree, mesh))}


def test_param_specs_split_esm_layer_matrices_and_their_moments():
  mesh = jax.sharding.AbstractMesh((2, 4), (mesh_lib.DATA_AXIS, mesh_lib.FSDP_AXIS))
  config, model, params = _tiny_model("last_n")
  specs = _specs_by_path(params, mesh)
  split = {p for p, s in specs.items() if s != jax.sharding.PartitionSpec()}
  # tiny ESM-2: 4 layers, D = 64, F = 256: the four kernels of every layer.
  assert split == {f"['esm']['layers']['{m}']['kernel']"
                   for m in ("qkv_proj", "out_proj", "fc1", "fc2")}, split
  assert specs["['esm']['layers']['fc1']['kernel']"] == jax.sharding.PartitionSpec(
      None, None, mesh_lib.FSDP_AXIS)
  assert specs["['esm']['layers']['fc2']['kernel']"] == jax.sharding.PartitionSpec(
      None, mesh_lib.FSDP_AXIS)
  # The trainable view of last_n ([1, ...] slices) and Adam's moments of it are split
  # as the parameters are, leaf by leaf.
  trainable = model.config.trainable
  view = jax.eval_shape(trainable.select, params)
  view_specs = _specs_by_path(view, mesh)
  assert view_specs["['esm']['layers']['fc1']['kernel']"] == specs[
      "['esm']['layers']['fc1']['kernel']"]
  opt = jax.eval_shape(optax.adam(1e-3).init, view)
  moments = {p: s for p, s in _specs_by_path(opt, mesh).items()
             if s != jax.sharding.PartitionSpec()}
  assert len(moments) == 2 * 4, moments  # mu and nu of the four kernels
  assert all("['esm']['layers']" in p and "kernel" in p for p in moments)


def test_mesh_refuses_fsdp_not_dividing_the_devices():
  import pytest  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match=r"train.fsdp=3 must .* divide the devices"):
    mesh_lib.make_mesh(jax.devices()[:1] * 1, fsdp_size=3)


_EIGHT_DEVICES = textwrap.dedent("""
  import os, tempfile
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8")
  import jax, numpy as np
  from bihier_jax import testing
  from bihier_jax.data import input_pipeline
  from bihier_jax.data.batch import PaddingBudget
  from bihier_jax import models
  from bihier_jax.training import checkpointing, device_batches, mesh as mesh_lib, steps, train_state
  from configs import demo

  assert jax.device_count() == 8, jax.devices()
  config = demo.get_config("tiny")
  config.model.gnn.dropout = config.model.fusion.dropout = config.model.head.dropout = 0.0
  config.optim.warmup_steps, config.optim.schedule = 0, "constant"
  budget = PaddingBudget(n_node=48, n_edge=700, n_graph=3, n_row=2, row_length=26)

  def batch(step):  # 8 sub-batches of 2 proteins, different at every step
    return device_batches.stack([input_pipeline.collate(
        [testing.random_example(10 + (3 * d + step) % 11, seed=d + 10 * step),
         testing.random_example(8 + d, seed=100 + d + 10 * step)], budget)
        for d in range(8)])

  batches = [batch(s) for s in range(3)]
  sample = input_pipeline.collate([testing.random_example(10, seed=0)], budget)
  model = models.build_model(config)
  KERNEL = ("esm", "layers", "fc1", "kernel")  # [4, 64, 256], split on its last axis

  def leaf(tree, path):
    for k in path:
      tree = tree[k]
    return tree

  def run(mesh, state=None, tx=None, first=0, last=3):
    if state is None:
      state, tx = train_state.create_train_state(config, model, sample, mesh, load_esm=False)
    fn = steps.jit_train_step(model, tx, config.task, mesh, state)
    losses = []
    for b in batches[first:last]:
      state, metrics = fn(state, mesh_lib.put_global(b, mesh))
      losses.append(float(metrics["loss"]))
    return state, tx, losses

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

  one, _, loss_one = run(mesh_lib.make_mesh(jax.devices()[:1]))
  ref_params = jax.device_get(one.params)
  print("1 device", loss_one)
  results = {}
  for size in (4, 8):
    mesh = mesh_lib.make_mesh(jax.devices(), size)
    state, tx, losses = run(mesh, last=2)
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
    state, _, more = run(mesh, state, tx, first=2)
    results[size] = losses + more
    print("fsdp", size, results[size])
    np.testing.assert_allclose(results[size], loss_one, rtol=0, atol=1e-5)
    close(jax.device_get(state.params), ref_params, f"fsdp={size} vs 1 device")

  # The fsdp=4 checkpoint of step 2 onto other meshes: 8 devices with fsdp=8, and 4
  # devices with fsdp=2 (two sub-batches per device), then step 3 as before.
  for devices, size in ((jax.devices(), 8), (jax.devices()[:4], 2)):
    mesh = mesh_lib.make_mesh(devices, size)
    abstract = train_state.abstract_train_state(config, model, sample, mesh)
    with checkpointing.Checkpointer(workdir, read_only=True) as ckpt:
      state, _, step = ckpt.restore("latest", abstract)
    assert step == 2 and int(state.step) == 2
    kernel = leaf(state.params, KERNEL)
    assert kernel.addressable_shards[0].data.shape == (4, 64, 256 // size)
    assert len(kernel.sharding.device_set) == len(devices)
    tx = steps.optim.make_optimizer(config)
    state, _, losses = run(mesh, state, tx, first=2)
    print(len(devices), "devices, fsdp", size, "after restore", losses)
    np.testing.assert_allclose(losses, results[4][2:], rtol=0, atol=1e-5)
    close(jax.device_get(state.params), ref_params, f"restored on {size}")

  # bfloat16: FSDP reduce-scatters each layer's gradient in float32 (fsdp.gather's
  # VJP), so its gradients equal plain data parallelism's on the same 8 devices up to
  # float32 summation order; summed in bf16 they differed by ~2e-3 of the largest entry.
  import functools
  bf16_config = config.copy_and_resolve_references()
  bf16_config.model.dtype = "bfloat16"
  bf16_model = models.build_model(bf16_config)
  grads = {}
  for size in (1, 4):
    mesh = mesh_lib.make_mesh(jax.devices(), size)
    params = jax.device_put(ref_params, mesh_lib.state_shardings(ref_params, mesh))
    fn = jax.jit(functools.partial(steps.loss_and_grads, model=bf16_model,
                                   task=config.task, mesh=mesh))
    _, grads[size] = jax.device_get(fn(params, mesh_lib.put_global(batches[0], mesh),
                                       one.rng, one.step))
  worst = 0.0
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads[4]),
                          jax.tree_util.tree_leaves(grads[1])):
    if "['esm']['layers']" in jax.tree_util.keystr(path):
      worst = max(worst, float(np.max(np.abs(a - b)) / np.max(np.abs(b))))
  print("bf16 gradients, fsdp=4 vs data parallel: max |difference| / max", worst)
  assert worst <= 1e-5, worst

  # The training loop end to end with fsdp=4: periodic evaluation on the per-host eval
  # mesh, sharded checkpoints, the final restore of the selected one; then a resumed
  # run continues from its checkpoint.
  import itertools
  from bihier_jax.training import train_lib

  def dataset_fn(data_dir, split, config, *, training, seed, process_index=None,
                 process_count=None, skip_batches=0):
    per = config.train.batch_size  # per device: 1
    def gen():
      for i in itertools.count(skip_batches):
        if not training and i >= 8:
          return
        exs = [testing.random_example(12 + (5 * i + j) % 7, seed=seed + 31 * i + j
                                      + (0 if training else 10_000)) for j in range(per)]
        yield input_pipeline.collate(exs, budget), {"ids": [e.id for e in exs],
                                                    "groups": [split] * per}
    return gen()

  run_config = demo.get_config("tiny")
  run_config.task.name = "synthetic"
  run_config.train.batch_size, run_config.train.fsdp = 8, 4
  run_config.train.num_steps, run_config.train.eval_every = 3, 2
  run_config.train.checkpoint_every = 2
  workdir = tempfile.mkdtemp()
  results = train_lib.train_and_evaluate(run_config, workdir, dataset_fn=dataset_fn)
  print("end to end", results)
  assert np.isfinite(results["test"]["accuracy"]), results
  run_config.train.num_steps = 4
  resumed = train_lib.train_and_evaluate(run_config, workdir, dataset_fn=dataset_fn)
  assert np.isfinite(resumed["test"]["loss"]), resumed
  print("OK")
""")


def test_fsdp_on_eight_devices_matches_one_device_and_restores_across_meshes():
  test_parallel.run_script(_EIGHT_DEVICES, timeout=600)


_HLO = """HloModule step

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(f32[] %a, f32[] %b)
}

%layer (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %ag = bf16[64,8]{1,0} all-gather(bf16[16,8]{1,0} %x), replica_groups={{0,1,2,3}}, dimensions={0}
  %rs = f32[2]{0} reduce-scatter(f32[8]{0} %y), replica_groups=[2,4]<=[8], dimensions={0}, to_apply=%add
  ROOT %t = (s32[], f32[8]{0}) tuple(s32[] %i, f32[8]{0} %y)
}

ENTRY %main (x: f32[8]) -> f32[16] {
  %w = (s32[], f32[8]{0}) while((s32[], f32[8]{0}) %init), condition=%cond, body=%layer, backend_config={"known_trip_count":{"n":"36"}}
  %ar = f32[16]{0} all-reduce(f32[16]{0} %z), replica_groups={{0,1}}, to_apply=%add
  ROOT %one = f32[16]{0} all-reduce(f32[16]{0} %ar), replica_groups={{0},{1}}, to_apply=%add
}
"""


def test_collective_bytes_counts_loop_trips_and_reduce_scatter_inputs():
  sys.path.insert(0, os.path.join(REPO, "bench"))
  try:
    import bench_sharding  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.pop(0)
  got = bench_sharding.collective_bytes(_HLO)
  assert got == {"all_gather": 36 * 64 * 8 * 2,  # the gathered bf16 result, 36 trips
                 "reduce_scatter": 36 * 4 * 2 * 4,  # group of 4 x the f32[2] piece
                 "all_reduce": 16 * 4}, got
  assert os.environ.get("XLA_FLAGS", "") == _XLA_FLAGS_BEFORE  # importing set nothing
