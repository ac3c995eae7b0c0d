"""What trains: frozen ESM-2 parameters are constants of the step, for every model kind.

Checks that `model.esm.trainable` means what it says: exactly zero gradients for frozen
parameters while activations still carry gradients through them; their weight-gradient
matmuls gone from the counted backward pass; one training step equal to a model that
closes over the ESM parameters as constants; last_n moving exactly the last n layers
and the final LayerNorm; no optimizer moments for frozen parameters; weight decay on
every weight matrix (ProNet's convolution and edge kernels included), on no bias or norm.

Tiny configs (ESM preset 'tiny': 4 layers x 64, FFN 256; GNN 2 blocks x 16).
"""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bihier_jax import models
from bihier_jax.common import flops
from bihier_jax import testing
from bihier_jax.models import esm2
from bihier_jax.models import heads
from bihier_jax.models import trainable as trainable_lib
from bihier_jax.training import optim
from bihier_jax.training import device_batches
from bihier_jax.training import mesh as mesh_lib
from bihier_jax.training import steps
from bihier_jax.training import train_state
from configs import default

ESM = esm2.PRESETS["tiny"]


@pytest.fixture(scope="module", autouse=True)
def _fast_compiles():
  """XLA's optimisation passes dominate the runtime of these tiny programs; both sides
  of every comparison here run with the same setting."""
  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", before)


def _config(kind="bihier", direction="bi", trainable="frozen", last_n=2, levels=(1, 2),
            pairing="even", dropout=0.1):
  return testing.tiny_config(default.get_config(), {
      "model.kind": kind, "model.esm.trainable": trainable, "model.esm.last_n": last_n,
      "model.gnn.dropout": dropout, "model.fusion.mode": "global",
      "model.fusion.direction": direction, "model.fusion.levels": levels,
      "model.fusion.layer_pairing": pairing, "model.fusion.dropout": dropout,
      "model.head.dropout": dropout})


@functools.lru_cache(maxsize=None)
def _batch():
  return jax.tree_util.tree_map(jnp.asarray, testing.batch_of(
      testing.small_examples(), n_graph=4, node_multiple=8))


def _loss_fn(model, task):
  def loss(params, batch):
    out = model.apply({"params": params}, batch, deterministic=False,
                      rngs={"dropout": jax.random.PRNGKey(1)})
    return heads.loss(task, out.logits, batch)[0]
  return loss


def _flat(tree):
  return flax.traverse_util.flatten_dict(tree)


VARIANTS = [
    ("esm_only", "bi", "frozen"), ("serial", "bi", "frozen"), ("parallel", "bi", "last_n"),
    ("cross", "bi", "frozen"), ("bihier", "bi", "frozen"), ("bihier", "seq2struct", "frozen"),
    ("bihier", "struct2seq", "frozen"), ("bihier", "bi", "last_n"),
    ("bihier", "struct2seq", "last_n"),
]


@pytest.mark.parametrize("kind,direction,policy", VARIANTS, ids=lambda v: str(v))
def test_frozen_parameters_get_exactly_zero_gradient(kind, direction, policy):
  config = _config(kind, direction, policy)
  model = models.build_model(config)
  batch = _batch()
  params = model.init(jax.random.PRNGKey(0), batch)["params"]
  grads = jax.jit(jax.grad(_loss_fn(model, config.task)))(params, batch)
  policy_of = trainable_lib.Trainable.from_config(config)
  for path, g in _flat(grads).items():
    g = np.asarray(g)
    start = policy_of.start(path)
    name = "/".join(path)
    if start is None:
      assert not g.any(), name
    elif start > 0:
      assert not g[:start].any(), name
      assert g[start:].any(), name
  if policy == "last_n":  # the trainable tail of the ESM really learns
    assert np.asarray(grads["esm"][esm2.FINAL_NORM_PARAM]["scale"]).any()
  if kind == "bihier" and direction != "seq2struct":
    # The write-back into the pLM stream learns through the frozen layers after it.
    assert np.asarray(grads["fusion_1"]["to_seq"]["kernel"]).any()


def _grad_flops(policy, last_n=2):
  # Fusion right after the embedding (ESM layer 0): every ESM layer lies downstream of
  # a trainable write-back, so frozen layers still need their activation gradients and
  # lose exactly their weight-gradient matmuls.
  config = _config("bihier", "bi", policy, last_n=last_n, levels=(1,), pairing="0")
  model = models.build_model(config)
  batch = _batch()
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), batch)["params"])
  return flops.matmul_flops(jax.value_and_grad(_loss_fn(model, config.task)),
                            params, batch)


def test_frozen_layers_lose_exactly_their_weight_gradient_matmuls(small_batch):
  tokens = int(np.prod(small_batch.tokens.shape))  # every slot of the token grid
  d, f = ESM.embed_dim, ESM.ffn_dim
  per_layer = 2 * tokens * (4 * d * d + 2 * d * f)  # q|k|v, out, fc1, fc2
  finetune = _grad_flops("finetune")
  assert finetune - _grad_flops("frozen") == ESM.num_layers * per_layer
  assert finetune - _grad_flops("last_n", last_n=1) == (ESM.num_layers - 1) * per_layer


def _one_step(config):
  """(old params, new params, step metrics, new state) of one real `train_step` at a
  constant learning rate (no warmup, so the first step moves what trains)."""
  config.optim.warmup_steps = 0
  config.optim.schedule = "constant"
  model = models.build_model(config)
  batch = jax.tree_util.tree_map(np.asarray, _batch())
  mesh = mesh_lib.make_mesh(jax.devices()[:1])
  state, tx = train_state.create_train_state(config, model, batch, mesh, load_esm=False)
  old = jax.device_get(state.params)
  step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx,
                                   task=config.task))
  new_state, metrics = step(state, device_batches.stack([batch]))
  return old, jax.device_get(new_state.params), jax.device_get(metrics), new_state


def test_frozen_update_equals_a_model_closing_over_constant_esm():
  """One step with model.esm.trainable=frozen and active clipping equals the update of
  the same model that closes over the ESM parameters (grads taken w.r.t. the rest)."""
  config = _config("bihier", "bi", "frozen", dropout=0.0)
  config.optim.grad_clip = 0.05  # small enough to clip
  old, new, metrics, _ = _one_step(config)

  reference = _config("bihier", "bi", "finetune", dropout=0.0)
  ref_model = models.build_model(reference)
  batch = _batch()
  esm_constant = old["esm"]
  rest = {k: v for k, v in old.items() if k != "esm"}
  loss = lambda rest: _loss_fn(ref_model, reference.task)({**rest, "esm": esm_constant},
                                                         batch)
  ref_loss, ref_grads = jax.jit(jax.value_and_grad(loss))(rest)
  assert float(optax.global_norm(ref_grads)) > config.optim.grad_clip  # clipping is on
  tx = optim.make_optimizer(config)
  updates, _ = tx.update(ref_grads, tx.init(rest), rest)
  want = optax.apply_updates(rest, updates)

  np.testing.assert_allclose(metrics["loss"], ref_loss, rtol=1e-6)
  np.testing.assert_allclose(metrics["grad_norm"], optax.global_norm(ref_grads), rtol=1e-5)
  # atol: gradients that are zero in exact arithmetic (attention key biases) are
  # rounding noise, which Adam's first step turns into updates far below lr = 5e-4.
  for path, w in _flat(want).items():
    np.testing.assert_allclose(_flat(new)[path], w, rtol=1e-5, atol=1e-6,
                               err_msg="/".join(path))
  for path, p in _flat(old["esm"]).items():
    np.testing.assert_array_equal(_flat(new["esm"])[path], p, err_msg="/".join(path))


def _moment_entries(opt_state):
  return sum(x.size for x in jax.tree_util.tree_leaves(opt_state)
             if hasattr(x, "ndim") and x.ndim > 0)


def test_last_n_moves_exactly_the_last_layers_and_the_final_norm():
  config = _config("bihier", "bi", "last_n", last_n=1)
  old, new, _, state = _one_step(config)
  first = ESM.num_layers - 1
  for path, p in _flat(old["esm"][esm2.LAYERS_PARAM]).items():
    q = _flat(new["esm"][esm2.LAYERS_PARAM])[path]
    np.testing.assert_array_equal(q[:first], p[:first], err_msg="/".join(path))
    assert np.all(q[first:] != p[first:]), "/".join(path)
  np.testing.assert_array_equal(new["esm"][esm2.EMBEDDING_PARAM]["embedding"],
                                old["esm"][esm2.EMBEDDING_PARAM]["embedding"])
  assert np.all(new["esm"][esm2.FINAL_NORM_PARAM]["scale"]
                != old["esm"][esm2.FINAL_NORM_PARAM]["scale"])
  # Adam keeps two moments per trained entry and none for the frozen ones.
  trained, total = trainable_lib.Trainable.from_config(config).count(old)
  assert trained < total
  assert _moment_entries(state.opt_state) == 2 * trained


def test_weight_decay_covers_every_weight_matrix_and_no_bias_or_norm(small_batch):
  config = _config("serial", trainable="finetune")
  model = models.build_model(config)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), small_batch)["params"])
  decayed = {"/".join(p) for p, leaf in _flat(params).items() if optim.decayed(p, leaf)}
  block = "gnn/blocks_0/"
  for name in ("conv_lin_l", "conv_lin_r", "lin_conv", "lin_feature0_1", "lin_feature2_2",
               "lin_1/kernel", "final/kernel"):
    assert block + name in decayed, name
  for name in ("conv_lin_l_bias", "lin_conv_bias", "lin_1/bias"):
    assert block + name not in decayed, name
  assert "esm/layers/qkv_proj/kernel" in decayed and "esm/embed_tokens/embedding" in decayed
  for name in ("esm/layers/qkv_proj/bias", "esm/layers/self_attn_layer_norm/scale",
               "esm/emb_layer_norm_after/scale", "gnn/embed_norm/scale"):
    assert name not in decayed, name
  assert "gnn/type_embed/embedding" in decayed


@pytest.mark.parametrize("policy", ["frozen", "finetune", "last_n"])
def test_optimizer_rates_on_the_trainable_view(policy):
  """Adam's first step moves each trained entry by the learning rate (esm_lr_ratio x it
  in the ESM branch); frozen entries are not in the view at all."""
  config = _config(trainable=policy, last_n=2)
  config.optim.esm_lr_ratio = 0.1
  config.optim.weight_decay = 0.0
  config.optim.warmup_steps = 0
  config.optim.schedule = "constant"
  config.optim.grad_clip = 0.0
  params = {
      "esm": {"embed_tokens": {"embedding": np.ones([5, 3], np.float32)},
              "layers": {"fc1": {"kernel": np.ones([4, 3, 3], np.float32)}},
              "emb_layer_norm_after": {"scale": np.ones([3], np.float32)}},
      "head": {"kernel": np.ones([3, 2], np.float32)},
  }
  policy_of = trainable_lib.Trainable(policy, num_esm_layers=4, last_n=2)
  view = policy_of.select(params)
  tx = optim.make_optimizer(config)
  grads = jax.tree_util.tree_map(lambda p: np.full_like(p, 0.5), view)
  updates, _ = tx.update(grads, tx.init(view), view)
  new = policy_of.apply_updates(params, updates)
  lr = config.optim.learning_rate
  np.testing.assert_allclose(new["head"]["kernel"], 1 - lr, rtol=1e-6)
  layers = new["esm"]["layers"]["fc1"]["kernel"]
  embedding = new["esm"]["embed_tokens"]["embedding"]
  norm = new["esm"]["emb_layer_norm_after"]["scale"]
  if policy == "frozen":
    assert "esm" not in view
    for leaf in (layers, embedding, norm):
      np.testing.assert_array_equal(leaf, 1.0)
  elif policy == "finetune":
    for leaf in (layers, embedding, norm):
      np.testing.assert_allclose(leaf, 1 - 0.1 * lr, rtol=1e-6)
  else:
    assert view["esm"]["layers"]["fc1"]["kernel"].shape == (2, 3, 3)
    assert "embed_tokens" not in view["esm"]
    np.testing.assert_array_equal(layers[:2], 1.0)
    np.testing.assert_allclose(layers[2:], 1 - 0.1 * lr, rtol=1e-6)
    np.testing.assert_array_equal(embedding, 1.0)
    np.testing.assert_allclose(norm, 1 - 0.1 * lr, rtol=1e-6)
