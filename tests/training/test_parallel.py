"""Data parallelism: 8 simulated CPU devices give the 1-device loss and gradients.

The 8-device check runs in a subprocess because XLA_FLAGS must be set before jax is
imported. Also: the resumable DeviceBatcher replays exactly the same stream.
Budget: < 40 s on an idle 2-core machine (one subprocess, one compile per mesh).
"""

import os
import subprocess
import sys
import textwrap

import numpy as np

from bihier_jax.data import input_pipeline
from bihier_jax import testing
from bihier_jax.training import device_batches
from bihier_jax.training import mesh as mesh_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_EIGHT_DEVICES = textwrap.dedent("""
  import os
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8")
  import jax, numpy as np
  from bihier_jax import testing
  from bihier_jax.data import input_pipeline
  from bihier_jax.data.batch import PaddingBudget
  from bihier_jax import models
  from bihier_jax.training import device_batches, mesh as mesh_lib, steps, train_state
  from configs import demo

  assert jax.device_count() == 8, jax.devices()
  config = demo.get_config("tiny")
  budget = PaddingBudget(n_node=48, n_edge=700, n_graph=3, n_row=2, row_length=26)
  subs = [input_pipeline.collate(
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

  def run(devices):
    fn, batch = step(devices)
    (loss, _), grads = fn(params, batch)
    return jax.device_get((loss, grads))

  # The same 8 sub-batches: a shard_map body on each of 8 devices, or a loop of 8 on one
  # device. Equal up to products of parameters alone (ProNet's fused edge kernels),
  # which JAX hoists out of the loop but every device computes: 0.24% here. A missing
  # x8 for the devices or for the loop would be a factor of 8.
  from bihier_jax.common import flops
  def count(devices):
    fn, batch = step(devices)
    return flops.matmul_flops(fn, params, batch)

  flops8, flops1 = count(jax.devices()), count(jax.devices()[:1])
  print("matmul flops", flops8, flops1)
  assert flops1 > 0 and 0 <= flops8 - flops1 < 0.01 * flops1

  l8, g8 = run(jax.devices())
  l1, g1 = run(jax.devices()[:1])
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
""")


def run_script(script: str, timeout: int) -> None:
  """Runs `script` in a fresh interpreter (its own XLA_FLAGS before jax starts) from the
  repository root; it must exit 0 and print OK."""
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0 and "OK" in proc.stdout, (
      proc.stdout[-3000:] + proc.stderr[-5000:])


def test_eight_devices_match_one_device():
  run_script(_EIGHT_DEVICES, timeout=300)


def _stream(budgets, start=0):
  """Raw batches whose budget follows `budgets`; meta records the raw index."""
  small = input_pipeline.budget_for([testing.random_example(6, seed=0)])
  big = input_pipeline.budget_for([testing.random_example(9, seed=0)])
  for i in range(start, len(budgets)):
    ex = testing.random_example(6 if budgets[i] == 0 else 9, seed=i)
    yield input_pipeline.collate([ex], small if budgets[i] == 0 else big), {"raw": i}


def test_device_batcher_groups_by_budget_and_resumes():
  rng = np.random.default_rng(0)
  budgets = rng.integers(0, 2, 60).tolist()
  full = device_batches.DeviceBatcher(_stream(budgets), 3)
  groups = [[m["raw"] for m in next(full)[1]] for _ in range(12)]
  for g in groups:
    assert len({budgets[i] for i in g}) == 1  # one budget per stack
  # Stop where batches were read but not used yet, restart from the saved position:
  # the same next groups.
  first = device_batches.DeviceBatcher(_stream(budgets), 3)
  done = 0
  while done < 3 or not first.position.pending:
    next(first)
    done += 1
  position = device_batches.InputPosition.from_json(first.position.to_json())
  assert position.resume_from < position.consumed
  resumed = device_batches.DeviceBatcher(_stream(budgets, position.resume_from), 3, position)
  again = [[m["raw"] for m in next(resumed)[1]] for _ in range(12 - done)]
  assert again == groups[done:]


def test_iterate_finite_fills_with_blanks():
  budgets = [0, 1, 0, 0, 1]
  out = list(device_batches.iterate_finite(_stream(budgets), 2))
  raws = sorted(m["raw"] for _, metas in out for m in metas if m is not None)
  assert raws == list(range(5))
  blanks = [(b, metas) for b, metas in out if None in metas]
  assert blanks
  for stacked, metas in blanks:
    d = metas.index(None)
    assert not stacked.node_mask[d].any() and not stacked.node_label_mask[d].any()


def test_accumulated_micro_batches_equal_one_large_batch():
  """train.grad_accum_steps: k sub-batches in one update give the loss, gradients and
  update of one batch holding all their proteins (dropout off, so the random keys of
  the two layouts do not matter)."""
  import jax  # pylint: disable=g-import-not-at-top
  from bihier_jax import models  # pylint: disable=g-import-not-at-top
  from bihier_jax.training import steps, train_state  # pylint: disable=g-import-not-at-top
  from configs import demo  # pylint: disable=g-import-not-at-top
  config = demo.get_config("tiny")
  config.model.gnn.dropout = config.model.fusion.dropout = config.model.head.dropout = 0.0
  # One GNN block fused once: the smallest fused model (compile time).
  config.model.gnn.num_blocks, config.model.fusion.levels = 1, (1,)
  config.optim.warmup_steps, config.optim.schedule = 0, "constant"
  examples = [testing.random_example(n, seed=i) for i, n in enumerate([9, 12, 7, 10])]
  big = input_pipeline.collate(examples, input_pipeline.budget_for(examples, n_graph=5))
  micro_budget = input_pipeline.budget_for(examples, n_graph=3)  # fits either pair
  micros = [input_pipeline.collate(examples[i:i + 2], micro_budget) for i in (0, 2)]
  model = models.build_model(config)
  mesh = mesh_lib.make_mesh(jax.devices()[:1])
  state, tx = train_state.create_train_state(config, model, big, mesh, load_esm=False)
  # Compiled once per layout; the optimizer's update is applied eagerly after.
  grads = jax.jit(lambda p, b: steps.loss_and_grads(p, b, state.rng, 0, model=model,
                                                    task=config.task))
  (loss_one, aux_one), g_one = grads(state.params, device_batches.stack([big]))
  (loss_acc, aux_acc), g_acc = grads(state.params, device_batches.stack(micros))
  np.testing.assert_allclose(loss_acc, loss_one, rtol=1e-6)
  np.testing.assert_allclose(aux_acc["label_weight"], aux_one["label_weight"])
  view = model.config.trainable.select(state.params)
  u_one, _ = tx.update(g_one, state.opt_state, view)
  u_acc, _ = tx.update(g_acc, state.opt_state, view)
  # Adam's first update is about lr·sign(g), so leaves with |g| near zero flip sign on
  # float32 summation-order differences: updates are compared where |g| is not tiny.
  for a, b, g, ua, uo in zip(*(jax.tree_util.tree_leaves(t) for t in
                               (g_acc, g_one, g_one, u_acc, u_one))):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    steady = np.abs(g) > 1e-3
    np.testing.assert_allclose(np.asarray(ua)[steady], np.asarray(uo)[steady], rtol=0,
                               atol=1e-5)
