"""LoRA on ESM-2 (model.esm.trainable=lora): step 0 is the base model, only adapters get
gradients, merged weights compute what the adapters compute, the optimizer sees
adapters only."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bihier_jax.models import esm2
from bihier_jax.models import trainable
from tests.models import test_trainable  # its one-step harness (_config, _one_step)

TARGETS = esm2.LORA_TARGETS
SEQUENCES = ["MKTAYIAKQRQISFVKSHFSRQ", "GSHMLEDPVRAAGLEK"]


def _setup(targets=TARGETS, rank=4):
  base = esm2.config_from_preset("tiny", attention="exact")
  adapted = dataclasses.replace(base, lora_rank=rank, lora_alpha=8.0,
                                lora_targets=targets)
  params = esm2.init_params(adapted, seed=1)
  tokens = jnp.asarray(esm2.tokenize(SEQUENCES))
  return base, adapted, params, tokens


def _run(cfg, params, tokens):
  return esm2.ESM2(cfg).apply({"params": params}, tokens).last_hidden_state


def test_step_zero_is_the_base_model_exactly():
  base, adapted, params, tokens = _setup()
  assert set(params["lora"]) == set(TARGETS)
  assert all(not np.any(ab["b"]) for ab in params["lora"].values())
  plain = {k: v for k, v in params.items() if k != "lora"}
  np.testing.assert_array_equal(_run(adapted, params, tokens), _run(base, plain, tokens))


def test_only_adapters_get_gradients_with_frozen_base():
  _, adapted, params, tokens = _setup()
  frozen = dataclasses.replace(adapted, frozen_embedding=True,
                               frozen_layers=adapted.num_layers, frozen_final_norm=True)
  # Non-zero B so that A gets a gradient too.
  params = dict(params, lora=jax.tree.map(
      lambda x: x + 0.01 * jax.random.normal(jax.random.key(3), x.shape), params["lora"]))
  grads = jax.grad(lambda p: jnp.sum(_run(frozen, p, tokens) ** 2))(params)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    name = jax.tree_util.keystr(path)
    if name.startswith("['lora']"):
      assert np.abs(np.asarray(g)).max() > 0, name
    else:
      assert not np.any(np.asarray(g)), name


@pytest.mark.parametrize("targets", [TARGETS, ("q", "v"), ("k", "fc2")])
def test_merged_weights_compute_the_adapted_model(targets):
  _, adapted, params, tokens = _setup(targets)
  params = dict(params, lora=jax.tree.map(
      lambda x: x + 0.05 * jax.random.normal(jax.random.key(7), x.shape), params["lora"]))
  merged_cfg, merged = esm2.merge_lora(adapted, params)
  assert merged_cfg.lora_rank == 0 and "lora" not in merged
  want = _run(adapted, params, tokens)
  got = _run(merged_cfg, merged, tokens)
  assert np.abs(np.asarray(want) - np.asarray(_run(merged_cfg, {
      k: v for k, v in params.items() if k != "lora"}, tokens))).max() > 1e-3
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_policy_trains_adapters_and_everything_outside_esm():
  from bihier_jax import models  # pylint: disable=g-import-not-at-top
  from bihier_jax import testing
  from bihier_jax.data import layout  # pylint: disable=g-import-not-at-top
  from configs import demo  # pylint: disable=g-import-not-at-top
  config = demo.get_config("tiny")
  config.model.esm.trainable = "lora"
  config.model.esm.lora_targets = ("q", "k", "v", "out")
  model = models.build_model(config)
  examples = [testing.random_example(20, seed=s) for s in range(2)]
  batch = layout.collate(examples, layout.budget_for(examples))
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), batch,
                                             deterministic=True)["params"])
  policy = trainable.Trainable.from_config(config)
  view = policy.select(params)
  assert set(view["esm"]) == {"lora"}
  assert set(view["esm"]["lora"]) == {"q", "k", "v", "out"}
  assert set(view) == set(params)  # the GNN, fusion and heads all train
  trained, total = policy.count(params)
  esm_total = sum(x.size for x in jax.tree.leaves(params["esm"]))
  lora_total = sum(x.size for x in jax.tree.leaves(params["esm"]["lora"]))
  assert trained == total - esm_total + lora_total
  cfg = esm2.config_from_preset("tiny")
  assert lora_total == cfg.num_layers * 4 * 8 * (cfg.embed_dim + cfg.embed_dim)


def test_bad_lora_settings_are_refused():
  with pytest.raises(ValueError, match="subset"):
    esm2.config_from_preset("tiny", lora_rank=4, lora_targets=("query",))
  with pytest.raises(ValueError, match="lora_rank=0"):
    trainable.Trainable(policy="lora", num_esm_layers=4, lora_rank=0)


def test_config_check_names_bad_lora_fields():
  from bihier_jax import config_check  # pylint: disable=g-import-not-at-top
  from configs import demo  # pylint: disable=g-import-not-at-top
  config = demo.get_config("tiny")
  config.model.esm.trainable = "lora"
  config_check.check(config, needs_data=False)
  config.model.esm.lora_targets = ("q", "query")
  with pytest.raises(config_check.ConfigError,
                     match=r"lora_targets='query' is not one of q \| k \| v"):
    config_check.check(config, needs_data=False)
  config.model.esm.lora_targets = ("q",)
  config.model.esm.lora_rank = 0
  with pytest.raises(config_check.ConfigError, match="lora_rank=0 must be >= 1"):
    config_check.check(config, needs_data=False)


def test_one_training_step_moves_adapters_not_base_weights():  # pylint: disable=too-many-locals
  """A real train_step of the fused model: the base ESM weights stay bit-identical, B
  moves off zero, the GNN moves, and Adam keeps moments for trained entries only."""
  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    config = test_trainable._config(trainable="lora")  # pylint: disable=protected-access
    old, new, metrics, new_state = test_trainable._one_step(config)  # pylint: disable=protected-access
  finally:
    jax.config.update("jax_disable_most_optimizations", before)
  assert np.isfinite(float(metrics["loss"]))
  for path, p in jax.tree_util.tree_leaves_with_path(old["esm"]):
    name = jax.tree_util.keystr(path)
    q = new["esm"]
    for key in path:
      q = q[key.key]
    if name.startswith("['lora']") and name.endswith("['b']"):
      assert np.abs(q).max() > 0, name
    elif not name.startswith("['lora']"):
      np.testing.assert_array_equal(q, p, err_msg=name)
  gnn_moved = [np.any(a != b) for a, b in zip(jax.tree.leaves(old["gnn"]),
                                              jax.tree.leaves(new["gnn"]))]
  assert any(gnn_moved)
  trained, _ = trainable.Trainable.from_config(config).count(old)
  moments = test_trainable._moment_entries(new_state.opt_state)  # pylint: disable=protected-access
  assert moments == 2 * trained


def test_export_from_run_merges_adapters(tmp_path):
  """convert_esm --from-run on a lora run's checkpoint: a plain ESM-2 checkpoint whose
  outputs equal the adapted branch's (to 1e-5), loadable by from_pretrained."""
  from bihier_jax import convert_esm, models  # pylint: disable=g-import-not-at-top
  from bihier_jax import testing
  from bihier_jax.data import layout  # pylint: disable=g-import-not-at-top
  from bihier_jax.training import checkpointing, mesh as mesh_lib, train_state  # pylint: disable=g-import-not-at-top
  from configs import demo  # pylint: disable=g-import-not-at-top
  config = demo.get_config("tiny")
  config.model.esm.trainable = "lora"
  config.model.esm.lora_targets = ("q", "v", "fc1")
  model = models.build_model(config)
  example = testing.random_example(16, seed=0)
  batch = layout.collate([example], layout.budget_for([example]))
  mesh = mesh_lib.make_mesh(jax.devices()[:1])
  state, _ = train_state.create_train_state(config, model, batch, mesh, load_esm=False)
  params = jax.device_get(state.params)
  params["esm"]["lora"] = jax.tree.map(  # as if trained: B off zero
      lambda x: x + 0.05 * np.asarray(jax.random.normal(jax.random.key(5), x.shape)),
      params["esm"]["lora"])
  state = state.replace(params=params)
  run = tmp_path / "run"
  ckpt = checkpointing.Checkpointer(str(run))
  ckpt.save(3, state, {"consumed": 3, "pending": []})
  ckpt.wait()
  ckpt.close()
  (run / "config.json").write_text(config.to_json_best_effort())

  out = str(tmp_path / "esm")
  assert convert_esm.main(["--from-run", str(run), "--out", out]) == 0
  merged_model, merged = esm2.from_pretrained(out)
  assert merged_model.config.lora_rank == 0 and "lora" not in merged
  tokens = jnp.asarray(esm2.tokenize(SEQUENCES))
  adapted = esm2.ESM2(model.config.esm).apply({"params": params["esm"]}, tokens)
  got = merged_model.apply({"params": merged}, tokens)
  np.testing.assert_allclose(got.last_hidden_state, adapted.last_hidden_state,
                             atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_adapters_train_at_their_own_rate(ratio):
  """Adam's first step moves every entry by its group's rate: adapters by
  optim.lora_lr_ratio x the schedule's rate (not esm_lr_ratio x it), the rest by lr."""
  from bihier_jax.training import optim  # pylint: disable=g-import-not-at-top
  config = test_trainable._config(trainable="lora")  # pylint: disable=protected-access
  config.optim.lora_lr_ratio = ratio
  config.optim.esm_lr_ratio = 0.1
  config.optim.weight_decay, config.optim.grad_clip = 0.0, 0.0
  config.optim.warmup_steps, config.optim.schedule = 0, "constant"
  params = {
      "esm": {"lora": {"q": {"a": np.ones([4, 3, 2], np.float32),
                             "b": np.ones([4, 2, 3], np.float32)}},
              "layers": {"fc1": {"kernel": np.ones([4, 3, 3], np.float32)}}},
      "head": {"kernel": np.ones([3, 2], np.float32)},
  }
  policy = trainable.Trainable("lora", num_esm_layers=4, lora_rank=2)
  view = policy.select(params)
  tx = optim.make_optimizer(config)
  grads = jax.tree_util.tree_map(lambda p: np.full_like(p, 0.5), view)
  updates, _ = tx.update(grads, tx.init(view), view)
  new = policy.apply_updates(params, updates)
  lr = float(optim.learning_rate_schedule(config)(0))
  for leaf in new["esm"]["lora"]["q"].values():
    np.testing.assert_allclose(leaf, 1 - ratio * lr, rtol=1e-6)
  np.testing.assert_allclose(new["head"]["kernel"], 1 - lr, rtol=1e-6)
  np.testing.assert_array_equal(new["esm"]["layers"]["fc1"]["kernel"], 1.0)
