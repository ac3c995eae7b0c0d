"""The assembled model: pLM stream exactness, invariances, gradients, every model kind.

Tiny configs (ESM preset 'tiny': 4 layers x 64; GNN 2 blocks x 16; fusion width 16) on a
batch of three synthetic proteins (one chain; two chains; one chain + 3 ligand atoms).
Budget: ≈ 50 s on 2 CPU cores (one compile of forward/backward per model variant;
variants are cached across tests).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial import transform

from bihier_jax import models
from bihier_jax.data import layout
from bihier_jax import testing
from bihier_jax.models import bihier
from bihier_jax.models import esm2
from bihier_jax.models import heads
from bihier_jax.models import tokens as tokens_lib
from configs import default


DEFAULTS = dict(kind="bihier", mode="global", direction="bi", trainable="finetune",
                level="node", levels=(1, 2), write_back="add", readout="auto", norm=True,
                mask=0.0)


@pytest.fixture(scope="module", autouse=True)
def _fast_compiles():
  """XLA's CPU optimisation passes dominate this file's runtime on tiny programs; the
  numbers compared here do not depend on them. Restored after the module."""
  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", before)


def _config(kind, mode, direction, trainable, level, levels, write_back, readout, norm,
            mask):
  c = testing.tiny_config(default.get_config(), {
      "model.kind": kind, "model.fusion.write_back": write_back,
      "model.readout": readout, "model.fusion.norm": norm,
      "model.gnn.mask_aatype_prob": mask, "model.esm.trainable": trainable,
      "model.gnn.dropout": 0.1, "model.fusion.mode": mode,
      "model.fusion.direction": direction, "model.fusion.levels": levels,
      "task.level": level})
  if level == "graph":
    c.task.loss, c.task.num_classes = "mse", 1
  return c


@functools.lru_cache(maxsize=None)
def _batch():
  examples = testing.small_examples()
  for ex in examples:
    ex.graph_label = 1.5
  return testing.batch_of(examples, n_graph=4, node_multiple=8)


def _to_jnp(batch):
  return jax.tree_util.tree_map(jnp.asarray, batch)


def _variant(**overrides):
  return _cached_variant(tuple(sorted({**DEFAULTS, **overrides}.items())))


@functools.lru_cache(maxsize=None)
def _cached_variant(items):
  """(config, params, grads, loss, train-mode output, forward) for one config variant."""
  config = _config(**dict(items))
  model = models.build_model(config)
  batch = _to_jnp(_batch())
  # Eager init: its per-op programs are shared by all variants (a jitted init is one
  # new program per variant).
  params = model.init(jax.random.PRNGKey(0), batch)["params"]

  def loss_fn(params, batch, rng):
    out = model.apply({"params": params}, batch, deterministic=False,
                      rngs={"dropout": rng})
    return heads.loss(config.task, out.logits, batch)[0], out

  grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  (loss, out), grads = grad_fn(params, batch, jax.random.PRNGKey(1))

  @jax.jit
  def forward(params, batch):
    out, state = model.apply({"params": params}, batch, mutable=["intermediates"])
    return out, state["intermediates"]

  return config, params, grads, loss, out, forward


def _norm(tree):
  return float(jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree_util.tree_leaves(tree))))


def _plain_esm(config, esm_params, tokens):
  esm = esm2.ESM2(bihier.BiHierConfig.from_config(config).esm)
  return jax.jit(lambda p, t: esm.apply({"params": p}, t, output_hidden_states=False)
                 .last_hidden_state)(esm_params, tokens)


def _perturb(params, seed):
  """Weights away from init: every parameter, incl. zero-initialised ones, random."""
  leaves, tree = jax.tree_util.tree_flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_unflatten(
      tree, [a + 0.05 * rng.normal(size=a.shape).astype(np.float32) for a in leaves])


@pytest.mark.parametrize("direction,bump", [("bi", False), ("seq2struct", True)])
def test_sequence_stream_equals_plain_esm(direction, bump):
  """Zero-initialised write-back (bi, at init) or none (seq2struct, any weights)."""
  mode = "global" if direction == "bi" else "local"
  config, params, _, _, _, forward = _variant(mode=mode, direction=direction)
  if bump:
    params = _perturb(params, seed=0)
  batch = _to_jnp(_batch())
  _, inter = forward(params, batch)
  got = np.asarray(inter["sequence_states"][0])
  want = np.asarray(_plain_esm(config, params["esm"], batch.tokens))
  real = np.asarray(batch.tokens) != 1
  np.testing.assert_allclose(got[real], want[real], rtol=1e-6, atol=1e-6)


def test_sequence_stream_changes_when_write_back_is_trained():
  """The check above can fail: with Dense0 moved away from zero, H differs."""
  config, params, _, _, _, forward = _variant()
  params = _perturb(params, seed=0)
  batch = _to_jnp(_batch())
  _, inter = forward(params, batch)
  want = _plain_esm(config, params["esm"], batch.tokens)
  assert np.abs(np.asarray(inter["sequence_states"][0]) - np.asarray(want)).max() > 1e-2


def _rigid_motion(batch, seed):
  rot = transform.Rotation.random(random_state=seed).as_matrix().astype(np.float32)
  shift = np.array([13.0, -7.0, 4.0], np.float32)
  nodes = dict(batch.graph.nodes)
  pos = np.asarray(nodes["atom_positions"])
  present = np.asarray(nodes["atom_mask"])[..., None] > 0
  nodes["atom_positions"] = np.where(present, pos @ rot.T + shift, pos).astype(np.float32)
  return batch.replace(graph=batch.graph._replace(nodes=nodes))


def test_rigid_motion_invariance():
  _, params, _, _, _, forward = _variant()
  batch = _batch()
  out, _ = forward(params, _to_jnp(batch))
  moved, _ = forward(params, _to_jnp(_rigid_motion(batch, seed=3)))
  mask = np.asarray(batch.node_mask)
  np.testing.assert_allclose(np.asarray(moved.logits)[mask], np.asarray(out.logits)[mask],
                             rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(moved.graph_embeddings, out.graph_embeddings,
                             rtol=1e-3, atol=1e-4)


def test_proteins_and_padding_do_not_leak():
  """Changing protein 1 (structure, residue types, tokens) and the padding nodes leaves
  proteins 0 and 2 unchanged."""
  _, params, _, _, _, forward = _variant()
  batch = _batch()
  out, _ = forward(params, _to_jnp(batch))
  node_graph = np.asarray(batch.node_graph)
  touched = (node_graph == 1) | ~np.asarray(batch.node_mask)
  nodes = dict(batch.graph.nodes)
  rng = np.random.default_rng(0)
  nodes["atom_positions"] = np.where(
      touched[:, None, None], nodes["atom_positions"] + rng.normal(size=(1, 1, 3)) * 2.0,
      nodes["atom_positions"]).astype(np.float32)
  nodes["aatype"] = np.where(touched, 25 - nodes["aatype"] % 20, nodes["aatype"])
  tokens = np.asarray(batch.tokens).copy()
  rows = np.asarray(batch.row_graph) == 1
  tokens[rows] = np.where(tokens[rows] > 3, 4 + (tokens[rows] + 5) % 20, tokens[rows])
  changed = batch.replace(graph=batch.graph._replace(nodes=nodes), tokens=tokens)
  out2, _ = forward(params, _to_jnp(changed))
  keep = ~touched
  np.testing.assert_allclose(np.asarray(out2.logits)[keep], np.asarray(out.logits)[keep],
                             rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(out2.logits)[node_graph == 1]
                - np.asarray(out.logits)[node_graph == 1]).max() > 1e-4


def test_gradients_reach_esm_gnn_and_fusion():
  _, _, grads, loss, _, _ = _variant()
  assert np.isfinite(float(loss))
  assert set(grads) >= {"esm", "gnn", "fusion_1", "fusion_2", "head", "seq_readout"}
  for name in ("esm", "gnn", "fusion_1", "fusion_2"):
    assert _norm(grads[name]) > 0, name
  # Every fusion leaf gets gradient, including the zero-initialised seq write-back.
  for path, leaf in jax.tree_util.tree_leaves_with_path(
      {k: v for k, v in grads.items() if k.startswith("fusion")}):
    assert np.abs(np.asarray(leaf)).max() > 0, jax.tree_util.keystr(path)


VARIANTS = [
    dict(kind="esm_only"),
    dict(kind="gnn_only", level="graph"),
    dict(kind="serial", trainable="frozen"),
    dict(kind="parallel", level="graph"),
    dict(kind="cross"),
    dict(kind="bihier", mode="local", direction="seq2struct"),
    dict(kind="bihier", mode="global", direction="struct2seq", level="graph",
         levels=(2,)),
    dict(kind="bihier", mode="local", direction="bi", levels=(2,)),
    dict(kind="cross", readout="streams", norm=False),
    dict(kind="bihier", mode="local", write_back="replace", readout="fused", mask=0.5),
]


@pytest.mark.parametrize("variant", VARIANTS,
                         ids=lambda v: "-".join(str(x) for x in v.values()))
def test_every_kind_trains_a_step(variant):
  config, params, grads, loss, out, _ = _variant(**variant)
  assert np.isfinite(float(loss))
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grads))
  assert ("esm" in params) == (variant["kind"] != "gnn_only")
  assert ("gnn" in params) == (variant["kind"] != "esm_only")
  if variant.get("trainable") == "frozen":  # stop_gradient on a frozen ESM branch
    assert _norm(grads["esm"]) == 0 and _norm(grads["gnn"]) > 0
  elif "esm" in params:
    assert _norm(grads["esm"]) > 0
  budget = _batch().budget
  rows = budget.n_node if config.task.level == "node" else budget.n_graph
  assert out.logits.shape == (rows, config.task.num_classes)
  assert out.graph_embeddings.shape[0] == budget.n_graph
  assert np.isfinite(np.asarray(out.logits)).all()
  assert not np.asarray(out.graph_embeddings)[-1].any()  # padding graph


@pytest.mark.parametrize("pairing,want", [
    ("even", (2, 3, 5, 6)), ("last", (3, 4, 5, 6)), ((1, 1, 4, 6), (1, 1, 4, 6)),
    ("1,1,4,6", (1, 1, 4, 6))])
def test_layer_pairing(pairing, want):
  assert bihier.esm_layer_pairing(pairing, (1, 2, 3, 4), 6, 4) == want
  assert bihier.esm_layer_pairing(pairing, (2, 4), 6, 4) == (want[1], want[3])


def test_bad_config_is_rejected():
  with pytest.raises(ValueError, match="fusion.levels"):
    c = _config(**{**DEFAULTS, "levels": (3,)})
    bihier.BiHierConfig.from_config(c)
  with pytest.raises(ValueError, match="nondecreasing"):
    bihier.esm_layer_pairing((4, 2), (1, 2), 6, 2)
  with pytest.raises(ValueError, match="layer_pairing"):
    bihier.esm_layer_pairing("middle", (1, 2), 6, 2)
  with pytest.raises(ValueError, match="model.kind"):
    c = _config(**{**DEFAULTS, "kind": "late"})
    bihier.BiHierConfig.from_config(c)


def test_masked_residues_get_the_mask_token():
  """mask_tokens puts <mask> exactly at the tokens of the masked residue nodes."""
  batch = _batch()
  rng = np.random.default_rng(0)
  hit = rng.random(batch.node_mask.shape) < 0.5
  got = np.asarray(tokens_lib.mask_tokens(jnp.asarray(batch.tokens),
                                          jnp.asarray(batch.node_to_token), jnp.asarray(hit)))
  want = np.asarray(batch.tokens).copy()
  for (row, col), h in zip(np.asarray(batch.node_to_token), hit):
    if h and row >= 0:
      want[row, col] = 32  # <mask>
  np.testing.assert_array_equal(got, want)
  assert (got == 32).sum() > 3



def test_row_layout_comes_from_the_batch():
  """A packed batch (several chains per ESM row) through a model built with
  data.pack_rows=False gives, at every real node, what one chain per row gives: the
  layout is read from the batch, so chains never attend to their row neighbours."""
  config = _config(**DEFAULTS)
  config.data.pack_rows = False
  model = models.build_model(config)
  _, params, _, _, _, _ = _variant()  # the same parameter tree (layout-free)
  logits = jax.jit(lambda p, b: model.apply({"params": p}, b).logits)
  examples = testing.small_examples()
  out = {}
  for packed in (False, True):
    budget = layout.budget_for(examples, n_graph=4, node_multiple=8,
                                       packed_rows=packed)
    if packed:  # two rows (protein 1 has two chains), shared by the proteins
      budget = dataclasses.replace(budget, n_row=2, row_length=64)
    batch = layout.collate(examples, budget)
    assert batch.packed_rows == packed
    assert (np.asarray(batch.token_segments).max() >= 2) == packed  # 3 chains in a row
    out[packed] = (np.asarray(logits(params, _to_jnp(batch))), np.asarray(batch.node_mask))
  (unpacked, mask), (packed_logits, packed_mask) = out[False], out[True]
  np.testing.assert_array_equal(mask, packed_mask)
  np.testing.assert_allclose(packed_logits[mask], unpacked[mask], rtol=1e-5, atol=1e-5)


def _dot_precisions(jaxpr) -> list:
  """The `precision` of every dot_general in a jaxpr and the jaxprs nested in it."""
  from jax.extend import core as jax_core  # pylint: disable=g-import-not-at-top
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      found.append(eqn.params["precision"])
    for value in eqn.params.values():
      for item in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(item, jax_core.ClosedJaxpr):
          found += _dot_precisions(item.jaxpr)
        elif isinstance(item, jax_core.Jaxpr):
          found += _dot_precisions(item)
  return found


def test_matmul_precision_reaches_every_matmul_of_the_step():
  """model.matmul_precision=highest sets the precision of every matmul of the training
  step (`steps.loss_and_grads`), forward and backward, custom VJP rules included (CPU
  computes float32 matmuls exactly either way, so the program is what can be checked
  here); 'default' leaves JAX's setting (None)."""
  from bihier_jax.training import device_batches, steps  # pylint: disable=g-import-not-at-top
  _, params, _, _, _, _ = _variant()
  batch = device_batches.stack([_batch()])
  rng = jax.random.key_data(jax.random.key(0))
  for setting, want in (("default", None), ("highest", jax.lax.Precision.HIGHEST)):
    config = _config(**DEFAULTS)
    config.model.matmul_precision = setting
    step = functools.partial(steps.loss_and_grads, model=models.build_model(config),
                             task=config.task)
    precisions = _dot_precisions(jax.make_jaxpr(step)(params, batch, rng, 0).jaxpr)
    assert len(precisions) > 50, len(precisions)  # ESM, GNN, fusion, head; backward
    expected = None if want is None else (want, want)
    assert all(p == expected for p in precisions), set(map(str, precisions))
