"""Parameter sharding over the 'fsdp' mesh axis (train.fsdp): layout rules, and on 8
simulated CPU devices the same losses and updates as 1 device, and checkpoints that
restore onto other meshes.

The multi-device checks are tests/multidevice/fsdp_equivalence.py, run in one
subprocess (XLA_FLAGS must be set before jax is imported): four compiled steps (1 device;
8 devices with fsdp 4 and 8; 4 devices with fsdp 2), bfloat16 gradients with fsdp 4 against plain data parallelism, and a short
training run with fsdp=4 (train, evaluate, resume), about 2.5 min on an idle 2-core
machine.
"""

import os
import sys

import jax
import optax

from bihier_jax import testing
from bihier_jax.models import fsdp
from bihier_jax.training import mesh as mesh_lib
from bihier_jax import models
from tests import multidevice
from tests import paths

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
  batch = testing.batch_of([testing.random_example(10, seed=0)])
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


def test_fsdp_on_eight_devices_matches_one_device_and_restores_across_meshes():
  multidevice.run("fsdp_equivalence", timeout=600)


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
  sys.path.insert(0, paths.BENCH)
  try:
    import bench_sharding  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.pop(0)
  got = bench_sharding.collective_bytes(_HLO)
  assert got == {"all_gather": 36 * 64 * 8 * 2,  # the gathered bf16 result, 36 trips
                 "reduce_scatter": 36 * 4 * 2 * 4,  # group of 4 x the f32[2] piece
                 "all_reduce": 16 * 4}, got
  assert os.environ.get("XLA_FLAGS", "") == _XLA_FLAGS_BEFORE  # importing set nothing
