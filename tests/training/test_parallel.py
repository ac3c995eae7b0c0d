"""Data parallelism: 8 simulated CPU devices give the 1-device loss and gradients.

The 8-device check is tests/multidevice/parallel_equivalence.py, run in a subprocess
because XLA_FLAGS must be set before jax is imported. Also: the resumable DeviceBatcher
replays exactly the same stream.
Budget: < 40 s on an idle 2-core machine (one subprocess, one compile per mesh).
"""

import numpy as np

from bihier_jax.data import layout
from bihier_jax import testing
from bihier_jax.training import device_batches
from bihier_jax.training import mesh as mesh_lib
from tests import multidevice


def test_eight_devices_match_one_device():
  multidevice.run("parallel_equivalence", timeout=300)


def _stream(budgets, start=0):
  """Raw batches whose budget follows `budgets`; meta records the raw index."""
  small = layout.budget_for([testing.random_example(6, seed=0)])
  big = layout.budget_for([testing.random_example(9, seed=0)])
  for i in range(start, len(budgets)):
    ex = testing.random_example(6 if budgets[i] == 0 else 9, seed=i)
    yield layout.collate([ex], small if budgets[i] == 0 else big), {"raw": i}


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
  big = layout.collate(examples, layout.budget_for(examples, n_graph=5))
  micro_budget = layout.budget_for(examples, n_graph=3)  # fits either pair
  micros = [layout.collate(examples[i:i + 2], micro_budget) for i in (0, 2)]
  model = models.build_model(config)
  mesh = mesh_lib.make_mesh(jax.devices()[:1])
  state, tx = train_state.create_train_state(config, model, big, mesh, load_esm=False)
  # Compiled once per layout; the optimizer's update is one jitted program for both
  # (applied eagerly, each of its ops on each parameter shape compiled on its own: ~15 s).
  grads = jax.jit(lambda p, b: steps.loss_and_grads(p, b, state.rng, 0, model=model,
                                                    task=config.task))
  (loss_one, aux_one), g_one = grads(state.params, device_batches.stack([big]))
  (loss_acc, aux_acc), g_acc = grads(state.params, device_batches.stack(micros))
  np.testing.assert_allclose(loss_acc, loss_one, rtol=1e-6)
  np.testing.assert_allclose(aux_acc["label_weight"], aux_one["label_weight"])
  view = model.config.trainable.select(state.params)
  update = jax.jit(tx.update)
  u_one, _ = update(g_one, state.opt_state, view)
  u_acc, _ = update(g_acc, state.opt_state, view)
  # Adam's first update is about lr·sign(g), so leaves with |g| near zero flip sign on
  # float32 summation-order differences: updates are compared where |g| is not tiny.
  for a, b, g, ua, uo in zip(*(jax.tree_util.tree_leaves(t) for t in
                               (g_acc, g_one, g_one, u_acc, u_one))):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    steady = np.abs(g) > 1e-3
    np.testing.assert_allclose(np.asarray(ua)[steady], np.asarray(uo)[steady], rtol=0,
                               atol=1e-5)
