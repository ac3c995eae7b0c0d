"""Fusion modules: gate maths against numpy, masking of global attention, write-backs.

Budget: ≈ 15 s on 2 CPU cores (tiny widths, a handful of small compiles).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from bihier_jax.models import fusion

D = 16
# Three proteins (3, 4, 2 nodes), then 3 padding nodes of the padding graph 3.
NODE_GRAPH = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3, 3], np.int32)
NODE_MASK = NODE_GRAPH < 3
NUM_GRAPHS = 4
# Node 8 is a ligand atom: a real structure token without a sequence token.
SEQ_MASK = NODE_MASK & (np.arange(12) != 8)


def _tokens(seed):
  rng = np.random.default_rng(seed)
  u = rng.normal(size=(12, D)).astype(np.float32)
  v = rng.normal(size=(12, D)).astype(np.float32)
  return u, v


def _gelu_tanh(x):
  # flax's nn.gelu default (tanh approximation, Hendrycks & Gimpel 2016).
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def test_local_gates_match_numpy_and_sum_to_one():
  u, v = _tokens(0)
  module = fusion.LocalFusion(hidden=8)
  params = module.init(jax.random.PRNGKey(0), u, v, SEQ_MASK)
  z, gates = module.apply(params, u, v, SEQ_MASK)

  p = params["params"]
  def vote(a):  # the shared MLP f, by hand
    h = a @ np.asarray(p["vote_hidden"]["kernel"]) + np.asarray(p["vote_hidden"]["bias"])
    h = _gelu_tanh(h)
    return h @ np.asarray(p["vote_out"]["kernel"]) + np.asarray(p["vote_out"]["bias"])
  want_gates = special.softmax(vote(u) + vote(v), axis=-1)
  want_gates[~SEQ_MASK] = [0.0, 1.0]  # no sequence token: structure side only
  np.testing.assert_allclose(gates, want_gates, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(gates).sum(-1), 1.0, rtol=1e-6)
  want_z = want_gates[:, :1] * u + want_gates[:, 1:] * v
  np.testing.assert_allclose(z, want_z, rtol=1e-5, atol=1e-5)
  assert 0.05 < float(np.asarray(gates)[SEQ_MASK, 0].mean()) < 0.95  # not a trivial gate


@pytest.fixture(scope="module")
def global_fusion():
  module = fusion.GlobalFusion(dim=D, num_heads=4)
  u, v = _tokens(1)
  params = module.init(jax.random.PRNGKey(1), u, v, NODE_GRAPH, SEQ_MASK, NODE_MASK,
                       NUM_GRAPHS, True)

  @jax.jit
  def apply(u, v):
    return module.apply(params, u, v, NODE_GRAPH, SEQ_MASK, NODE_MASK, NUM_GRAPHS, True)
  return module, params, apply


def test_global_ignores_padding(global_fusion):
  _, _, apply = global_fusion
  u, v = _tokens(2)
  zs, zg = apply(u, v)
  u2, v2 = u.copy(), v.copy()
  u2[~SEQ_MASK] = 100.0 * np.random.default_rng(3).normal(size=((~SEQ_MASK).sum(), D))
  v2[~NODE_MASK] = -50.0
  zs2, zg2 = apply(u2, v2)
  np.testing.assert_array_equal(np.asarray(zs)[SEQ_MASK], np.asarray(zs2)[SEQ_MASK])
  np.testing.assert_array_equal(np.asarray(zg)[NODE_MASK], np.asarray(zg2)[NODE_MASK])
  assert not np.asarray(zs)[~SEQ_MASK].any() and not np.asarray(zg)[~NODE_MASK].any()


def test_global_proteins_do_not_see_each_other(global_fusion):
  _, _, apply = global_fusion
  u, v = _tokens(4)
  zs, zg = apply(u, v)
  other = NODE_GRAPH == 1
  u2, v2 = u.copy(), v.copy()
  u2[other] += 3.0
  v2[other] *= -2.0
  zs2, zg2 = apply(u2, v2)
  same = ~other
  np.testing.assert_allclose(np.asarray(zs)[same], np.asarray(zs2)[same], atol=1e-6)
  np.testing.assert_allclose(np.asarray(zg)[same], np.asarray(zg2)[same], atol=1e-6)
  assert np.abs(np.asarray(zg)[other] - np.asarray(zg2)[other]).max() > 1e-2


def test_global_equals_each_protein_alone(global_fusion):
  """The batched, masked attention equals running the block on one protein's 2n tokens."""
  module, params, apply = global_fusion
  u, v = _tokens(5)
  zs, zg = apply(u, v)
  p = params["params"]
  block = fusion.JointTokenBlock(num_heads=4)
  for g in range(3):
    nodes = np.flatnonzero(NODE_GRAPH == g)
    seq_nodes = nodes[SEQ_MASK[nodes]]
    tokens = np.concatenate([u[seq_nodes] + np.asarray(p["seq_type_embedding"]),
                             v[nodes] + np.asarray(p["struct_type_embedding"])])
    allowed = np.ones((1, len(tokens), len(tokens)), bool)
    out = np.asarray(block.apply({"params": p["block"]}, tokens[None], allowed, True))[0]
    np.testing.assert_allclose(np.asarray(zs)[seq_nodes], out[:len(seq_nodes)],
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(zg)[nodes], out[len(seq_nodes):],
                               rtol=1e-4, atol=1e-5)
  del module


def _slot_table(capacity, order=None):
  """int32[G-1, P]: node of each (real graph, slot), built here by hand; `order` permutes
  each graph's slots (the layout need not follow node order)."""
  table = np.full((NUM_GRAPHS - 1, capacity), -1, np.int32)
  for g in range(NUM_GRAPHS - 1):
    nodes = np.flatnonzero((NODE_GRAPH == g) & NODE_MASK)
    if order is not None:
      nodes = nodes[order(len(nodes))]
    table[g, :len(nodes)] = nodes
  return table


@pytest.mark.parametrize("capacity,shuffled", [(4, False), (6, True)])
def test_per_graph_layout_equals_dense(global_fusion, capacity, shuffled):
  _, params, apply = global_fusion
  u, v = _tokens(6)
  want = apply(u, v)
  rng = np.random.default_rng(0)
  table = _slot_table(capacity, rng.permutation if shuffled else None)
  module = fusion.GlobalFusion(dim=D, num_heads=4)
  run = lambda p, u, slots: module.apply(p, u, v, NODE_GRAPH, SEQ_MASK, NODE_MASK,
                                         NUM_GRAPHS, True, slots)
  for a, b in zip(want, run(params, u, table)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  def grads(slots):
    f = lambda p, u: sum(jnp.sum(jnp.sin(z)) for z in run(p, u, slots))
    return jax.grad(f, argnums=(0, 1))(params, u)
  for a, b in zip(jax.tree_util.tree_leaves(grads(None)),
                  jax.tree_util.tree_leaves(grads(table))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # P = 0 slots: the dense layout.
  for a, b in zip(want, run(params, u, np.zeros((NUM_GRAPHS - 1, 0), np.int32))):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)  # jit vs eager rounding


@pytest.mark.parametrize("mode", ["local", "global"])
def test_write_back_directions(mode):
  """Zero-initialised seq write-back: H unchanged at init; directions switch streams."""
  rng = np.random.default_rng(7)
  hidden = rng.normal(size=(3, 6, 24)).astype(np.float32)  # R=3 rows, L=6, ds=24
  x = rng.normal(size=(12, 8)).astype(np.float32)
  node_to_token = np.full((12, 2), -1, np.int32)
  node_to_token[[0, 1, 2]] = [[0, 1], [0, 2], [0, 3]]
  node_to_token[3:7] = np.stack([np.full(4, 1), np.arange(1, 5)], -1)
  node_to_token[7] = [2, 1]
  args = (node_to_token, NODE_GRAPH, NODE_MASK, NUM_GRAPHS, True)

  level = fusion.FusionLevel(mode=mode, dim=D, num_heads=4)
  params = level.init(jax.random.PRNGKey(0), hidden, x, *args)
  out = level.apply(params, hidden, x, *args)
  h1, x1 = out.hidden, out.x
  np.testing.assert_array_equal(h1, hidden)  # Dense0: pLM exactly as before
  assert np.abs(np.asarray(x1) - x)[NODE_MASK].max() > 1e-3
  np.testing.assert_array_equal(np.asarray(x1)[~NODE_MASK], x[~NODE_MASK])

  # After training moves Dense0, only tokens that nodes map to change.
  bumped = jax.tree_util.tree_map(lambda a: a + 0.1, params)
  h2 = level.apply(bumped, hidden, x, *args).hidden
  changed = np.abs(np.asarray(h2) - hidden).max(-1) > 0
  target = np.zeros((3, 6), bool)
  target[node_to_token[:8, 0], node_to_token[:8, 1]] = True
  np.testing.assert_array_equal(changed, target)

  seq2struct = fusion.FusionLevel(mode=mode, dim=D, num_heads=4, write_seq=False)
  h3 = seq2struct.apply(bumped, hidden, x, *args).hidden
  np.testing.assert_array_equal(h3, hidden)
  struct2seq = fusion.FusionLevel(mode=mode, dim=D, num_heads=4, write_struct=False)
  out4 = struct2seq.apply(bumped, hidden, x, *args)
  h4, x4 = out4.hidden, out4.x
  np.testing.assert_array_equal(x4, x)
  np.testing.assert_allclose(h4, h2, rtol=1e-6)


def _write_back_case():
  rng = np.random.default_rng(8)
  hidden = rng.normal(size=(3, 6, 24)).astype(np.float32)
  x = (1e-3 * rng.normal(size=(12, 8))).astype(np.float32)  # ProNet-sized states
  node_to_token = np.full((12, 2), -1, np.int32)
  node_to_token[:8] = [[0, 1], [0, 2], [0, 3], [1, 1], [1, 2], [1, 3], [1, 4], [2, 1]]
  node_to_token[8] = -1  # the ligand atom
  return hidden, x, (node_to_token, NODE_GRAPH, NODE_MASK, NUM_GRAPHS, True)


def _dense(z, p):
  return np.asarray(z) @ np.asarray(p["kernel"]) + np.asarray(p["bias"])


def _layer_norm(a, p, eps):
  a = np.asarray(a, np.float64)
  centred = a - a.mean(-1, keepdims=True)
  y = centred / np.sqrt((centred ** 2).mean(-1, keepdims=True) + eps)
  return y * np.asarray(p["scale"]) + np.asarray(p["bias"])


def test_structure_stream_continues_from_its_normalised_state():
  """With norm: X <- LN(X) + Dense(Zg), LN with the structure epsilon (tiny states are
  normalised, not flattened by the epsilon); padding nodes keep their states."""
  hidden, x, args = _write_back_case()
  level = fusion.FusionLevel(mode="local", dim=D)
  params = level.init(jax.random.PRNGKey(0), hidden, x, *args)
  out = level.apply(params, hidden, x, *args)
  p = params["params"]
  normed = _layer_norm(x, p["struct_norm"], fusion.STRUCT_NORM_EPS)
  want = normed + _dense(out.z_struct, p["to_struct"])
  np.testing.assert_allclose(np.asarray(out.x)[NODE_MASK], want[NODE_MASK], rtol=1e-4,
                             atol=1e-5)
  assert np.abs(normed[NODE_MASK]).std() > 0.5  # O(1), from states of size 1e-3
  np.testing.assert_array_equal(np.asarray(out.x)[~NODE_MASK], x[~NODE_MASK])


def test_replace_write_back():
  """write_back=replace: residue tokens of H become Dense(Zs), real nodes of X become
  Dense(Zg); tokens without a node (<cls>, <eos>, padding) and padding nodes keep their
  states."""
  hidden, x, args = _write_back_case()
  node_to_token = args[0]
  level = fusion.FusionLevel(mode="global", dim=D, num_heads=4, write_back="replace")
  params = level.init(jax.random.PRNGKey(0), hidden, x, *args)
  out = level.apply(params, hidden, x, *args)
  p = params["params"]
  has_token = (node_to_token[:, 0] >= 0) & NODE_MASK
  rows, cols = node_to_token[has_token, 0], node_to_token[has_token, 1]
  np.testing.assert_allclose(np.asarray(out.hidden)[rows, cols],
                             _dense(out.z_seq, p["to_seq"])[has_token], rtol=1e-5,
                             atol=1e-6)
  untouched = np.ones(hidden.shape[:2], bool)
  untouched[rows, cols] = False
  np.testing.assert_array_equal(np.asarray(out.hidden)[untouched], hidden[untouched])
  np.testing.assert_allclose(np.asarray(out.x)[NODE_MASK],
                             _dense(out.z_struct, p["to_struct"])[NODE_MASK], rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_array_equal(np.asarray(out.x)[~NODE_MASK], x[~NODE_MASK])


def test_key_mask_equals_pair_mask_with_gradients():
  """A key mask equals the same mask written as (query, key) pairs, with masked tokens
  anywhere in a row (the per-graph layout has holes), gradients included."""
  rng = np.random.default_rng(3)
  b, t, width = 3, 11, 16
  tokens = jnp.asarray(rng.normal(size=(b, t, width)), jnp.float32)
  key_mask = rng.random((b, t)) < 0.7
  key_mask[:, 0] = True
  key_mask = jnp.asarray(key_mask)
  pairs = jnp.broadcast_to(key_mask[:, None, :], (b, t, t))
  block = fusion.JointTokenBlock(num_heads=4)
  params = block.init(jax.random.PRNGKey(0), tokens, pairs, True)

  def run(p, x, mask):
    out = block.apply(p, x, mask, True)
    return jnp.sum(jnp.sin(out) * key_mask[..., None]), out

  (_, want), want_grads = jax.value_and_grad(run, argnums=(0, 1), has_aux=True)(
      params, tokens, pairs)
  (_, got), got_grads = jax.value_and_grad(run, argnums=(0, 1), has_aux=True)(
      params, tokens, key_mask)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  for a, b_ in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(a, b_, rtol=1e-4, atol=1e-5)
  # Padded token values do not reach real outputs.
  noisy = jnp.where(key_mask[..., None], tokens, 100.0)
  _, out = run(params, noisy, key_mask)
  np.testing.assert_allclose(np.asarray(out)[np.asarray(key_mask)],
                             np.asarray(got)[np.asarray(key_mask)], rtol=1e-5, atol=1e-5)
