"""ProNet-style structure encoder: geometry, invariance, padding, learning.

Budget: ~60 s in all on 2 CPU cores (the slow learning test ~30 s of it). Programs are
compiled with XLA's optimisation passes off (see `_fast_compiles`).
"""

import functools
import glob
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.spatial import transform

from bihier_jax.data import featurize
from bihier_jax.data import layout
from bihier_jax import testing
from bihier_jax.models import pronet

_DSSP_DIR = None
try:
  import MDAnalysisTests  # pylint: disable=g-import-not-at-top
  _DSSP_DIR = os.path.join(os.path.dirname(MDAnalysisTests.__file__), "data", "dssp")
except ImportError:
  pass

_SS_CLASSES = {"H": 0, "G": 0, "I": 0, "E": 1, "B": 1}  # helix, strand; else coil (2)


def _collate(examples, node_multiple=32, edge_multiple=256, n_graph=None):
  budget = layout.budget_for(examples, node_multiple=node_multiple,
                                     edge_multiple=edge_multiple, n_graph=n_graph)
  return layout.collate(examples, budget)


def _dssp_examples(names):
  """Real chains from MDAnalysisTests with per-residue 3-class DSSP labels."""
  if _DSSP_DIR is None or not os.path.isdir(_DSSP_DIR):
    pytest.skip("MDAnalysisTests DSSP data not installed")
  examples = []
  for name in names:
    path = os.path.join(_DSSP_DIR, name + ".pdb.gz")
    with open(path[:-3] + ".dssp") as f:
      dssp = f.readline().split()[0]
    labels = np.array([_SS_CLASSES.get(c, 2) for c in dssp], np.float32)
    (example,) = featurize.examples_from_file(path, per_chain=False, node_labels=labels)
    assert example.num_residues == len(dssp), name
    examples.append(example)
  return examples


def _encoder(level, hidden=16, num_blocks=2, **kw):
  cfg = pronet.ProNetConfig(level=level, hidden=hidden, num_blocks=num_blocks, **kw)
  enc = pronet.ProNet(cfg)
  return enc


@functools.lru_cache(maxsize=None)
def _jitted_apply(enc):
  return jax.jit(lambda v, graph: enc.apply(v, graph).nodes)


def _init(enc, graph, seed=0):
  return enc.init(jax.random.PRNGKey(seed), graph)


@pytest.fixture(scope="module", autouse=True)
def _fast_compiles():
  """XLA's CPU optimisation passes are most of this file's compile time (a ProNet
  gradient compiled in ~20 s with them); what the tests compare (invariances, padding,
  finiteness, exact API equalities, a learning run's loss and accuracy thresholds) does
  not depend on them. Restored after the module."""
  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", before)


# --- geometry on constructed inputs ----------------------------------------------------

def test_theta_phi_right_angles():
  origin = jnp.zeros((3, 3))
  r0 = jnp.array([[1.0, 0, 0]] * 3)
  r1 = jnp.array([[0, 1.0, 0]] * 3)
  j = jnp.array([[0, 0, 2.0], [0, 3.0, 0], [-1.0, 0, 0]])
  theta, phi = pronet.theta_phi(origin, j, r0, r1)
  # j ⟂ r0 out of the (r0, r1) plane; j ⟂ r0 in the plane; j opposite r0.
  np.testing.assert_allclose(theta, [np.pi / 2, np.pi / 2, np.pi], atol=1e-6)
  np.testing.assert_allclose(phi[:2], [np.pi / 2, 0.0], atol=1e-6)


def _iupac_dihedral(p0, p1, p2, p3):
  """Signed dihedral (IUPAC convention, independent formula)."""
  b0, b1, b2 = p0 - p1, p2 - p1, p3 - p2
  b1 = b1 / np.linalg.norm(b1)
  v = b0 - np.dot(b0, b1) * b1
  w = b2 - np.dot(b2, b1) * b1
  return np.arctan2(np.dot(np.cross(b1, v), w), np.dot(v, w))


def test_tau_is_the_calpha_pseudo_torsion_of_an_ideal_helix():
  # Ideal α-helix: 3.6 residues/turn, rise 1.5 Å, Cα radius 2.3 Å. Its Cα
  # pseudo-torsion (i−1, i, i+1, i+2) is about +50° (right-handed).
  t = np.arange(6) * np.deg2rad(100.0)
  ca = np.stack([2.3 * np.cos(t), 2.3 * np.sin(t), 1.5 * np.arange(6)], -1)
  expected = _iupac_dihedral(ca[1], ca[2], ca[3], ca[4])
  assert np.rad2deg(expected) == pytest.approx(50.0, abs=5.0)
  # Edge j = 3 -> i = 2; i's reference is 1; j's first reference (2) is i itself, so
  # the reference swaps it for 4: τ is the torsion (1, 2, 3, 4).
  prev = jnp.array([0, 0, 1, 2, 3, 4])
  nxt = jnp.array([1, 2, 3, 4, 5, 5])
  ref0, ref1 = pronet.frame_references(prev, nxt)
  i, j = 2, 3
  ref_i = ref1[i] if ref0[i] == j else ref0[i]
  ref_j = ref1[j] if ref0[j] == i else ref0[j]
  assert (int(ref_i), int(ref_j)) == (1, 4)
  pos = jnp.asarray(ca, jnp.float32)
  tau = pronet.dihedral(pos[j] - pos[i], pos[ref_i] - pos[i], pos[ref_j] - pos[j])
  assert float(tau) == pytest.approx(expected, abs=1e-5)


def test_frame_references_stay_in_chain():
  # Chain 0..3, then a single-residue chain 4, then a ligand atom 5.
  prev = jnp.array([0, 0, 1, 2, 4, 5])
  nxt = jnp.array([1, 2, 3, 3, 4, 5])
  ref0, ref1 = pronet.frame_references(prev, nxt)
  np.testing.assert_array_equal(ref0, [2, 0, 1, 2, 4, 5])
  np.testing.assert_array_equal(ref1, [1, 2, 3, 1, 4, 5])


def test_euler_angles_recover_known_rotation():
  rng = np.random.default_rng(0)
  for _ in range(5):
    angles = rng.uniform([-3.0, 0.2, -3.0], [3.0, 2.9, 3.0])
    rot = transform.Rotation.from_euler("ZXZ", angles).as_matrix()
    # Residue i in the canonical frame: x = Cα->N along +x, z = +z (C in the xz plane).
    n_i, ca_i, c_i = np.array([1.46, 0, 0]), np.zeros(3), np.array([-0.5, 0, -1.4])
    shift = rng.normal(size=3) * 5
    n_j, ca_j, c_j = (rot @ p + shift for p in (n_i, ca_i, c_i))
    frame_i = pronet.residue_frame(*(jnp.asarray(p[None]) for p in (n_i, ca_i, c_i)))
    frame_j = pronet.residue_frame(*(jnp.asarray(p[None]) for p in (n_j, ca_j, c_j)))
    np.testing.assert_allclose(frame_i[1][0], [0, 0, 1], atol=1e-6)
    got = np.array([float(a[0]) for a in pronet.euler_angles(frame_i, frame_j)])
    np.testing.assert_allclose(got, angles, atol=1e-5)


def test_sequence_offset_embedding():
  emb = pronet.sequence_offset_embedding(jnp.array([0, 3, -3, 5]),
                                         jnp.array([True, True, True, False]))
  freq = np.exp(np.arange(0, 16, 2) * -(np.log(10000.0) / 16))
  np.testing.assert_allclose(emb[1], np.concatenate([np.cos(3 * freq), np.sin(3 * freq)]),
                             atol=1e-6)
  np.testing.assert_allclose(emb[2, :8], emb[1, :8], atol=1e-6)  # cos even, sin odd
  np.testing.assert_allclose(emb[2, 8:], -emb[1, 8:], atol=1e-6)
  np.testing.assert_array_equal(emb[3], 0.0)  # "no offset": other chain / ligand


# --- invariance ------------------------------------------------------------------------

def _rigid_motion(graph, seed):
  rot = transform.Rotation.random(random_state=seed).as_matrix().astype(np.float32)
  shift = np.random.default_rng(seed).normal(size=3).astype(np.float32) * 30.0
  nodes = dict(graph.nodes)
  nodes["atom_positions"] = np.asarray(graph.nodes["atom_positions"]) @ rot.T + shift
  return graph._replace(nodes=nodes)


@pytest.fixture(scope="module")
def mixed_batch():
  """A real chain, a 2-chain synthetic protein and a synthetic protein with a ligand."""
  examples = _dssp_examples(["2xcjA"]) + [
      testing.random_example(24, seed=1, n_chains=2),
      testing.random_example(16, seed=2, n_ligand=6)]
  return _collate(examples)


@pytest.mark.parametrize("level", pronet.LEVELS)
def test_rotation_translation_invariance(level, mixed_batch):
  enc = _encoder(level)
  graph = mixed_batch.graph
  variables = _init(enc, graph)
  apply = jax.jit(lambda v, g: enc.apply(v, g).node_states)
  before = apply(variables, graph)
  after = apply(variables, _rigid_motion(graph, seed=3))
  real = np.asarray(mixed_batch.node_mask)
  for k, (b, a) in enumerate(zip(before, after)):  # every state, also the blocks'
    b, a = np.asarray(b)[real], np.asarray(a)[real]
    assert np.isfinite(a).all(), k
    scale = np.abs(b).max()
    assert scale > 1e-3, k  # not trivially constant
    np.testing.assert_allclose(a, b, atol=min(1e-4, 1e-3 * scale), err_msg=f"state {k}")


# --- padding ---------------------------------------------------------------------------

def test_padding_alone_vs_batched_and_padded_values():
  target = testing.random_example(20, seed=5, n_chains=2, n_ligand=3)
  others = [testing.random_example(18, seed=6), testing.random_example(12, seed=7)]
  alone = _collate([target], node_multiple=64, edge_multiple=512)
  batched = _collate([others[0], target, others[1]], node_multiple=128,
                     edge_multiple=2048, n_graph=6)
  enc = _encoder("all_atom")
  variables = _init(enc, batched.graph)
  apply = _jitted_apply(enc)
  out_alone = np.asarray(apply(variables, alone.graph))
  out_batched = np.asarray(apply(variables, batched.graph))
  n = target.num_residues + 3
  start = others[0].num_residues
  np.testing.assert_allclose(out_batched[start:start + n], out_alone[:n], atol=1e-5)

  # Scramble every padded slot: real outputs must not move.
  real = np.asarray(batched.node_mask)
  rng = np.random.default_rng(0)
  nodes = {k: np.array(v) for k, v in batched.graph.nodes.items()}
  pad = ~real
  nodes["atom_positions"][pad] = rng.normal(size=nodes["atom_positions"][pad].shape) * 50
  nodes["atom_mask"][pad] = 1.0
  nodes["aatype"][pad] = rng.integers(0, pronet.NUM_NODE_TYPES, pad.sum())
  nodes["backbone_dihedrals"][pad] = rng.normal(size=(pad.sum(), 6))
  nodes["sidechain_torsions"][pad] = rng.normal(size=(pad.sum(), 8))
  nodes["residue_index"][pad] = rng.integers(0, 1000, pad.sum())
  nodes["chain_id"][pad] = 0
  scrambled = batched.graph._replace(nodes=nodes)
  out_scrambled = np.asarray(apply(variables, scrambled))
  np.testing.assert_allclose(out_scrambled[real], out_batched[real], atol=1e-6)


def test_gradients_finite_with_padding_and_degenerate_frames():
  # Ligand atoms, chain ends and a missing N give degenerate frames; padding edges are
  # self loops at d = 0.
  example = testing.random_example(10, seed=8, n_chains=2, n_ligand=4)
  example.atom_mask[3, 0] = False
  example.atom_positions[3, 0] = 0.0
  batch = _collate([example], node_multiple=64, edge_multiple=512)
  real = jnp.asarray(batch.node_mask)[:, None]
  for level in ("amino_acid", "backbone"):  # all_atom shares backbone's geometry
    enc = _encoder(level, hidden=8, num_blocks=1, dropout=0.1, coord_noise_std=0.1,
                   mask_aatype_prob=0.2)
    variables = _init(enc, batch.graph)

    def loss(params, positions):
      nodes = dict(batch.graph.nodes, atom_positions=positions)
      out = enc.apply({"params": params}, batch.graph._replace(nodes=nodes),
                      deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
      return jnp.sum(jnp.where(real, out.nodes, 0.0) ** 2)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(
        variables["params"], jnp.asarray(batch.graph.nodes["atom_positions"]))
    for leaf in jax.tree_util.tree_leaves(grads):
      assert np.isfinite(np.asarray(leaf)).all(), level


# --- API -------------------------------------------------------------------------------

def test_embed_and_blocks_match_whole_encoder_and_work_from_a_parent():
  batch = _collate([testing.random_example(20, seed=9)])
  enc = _encoder("backbone", num_blocks=3)
  variables = _init(enc, batch.graph)
  out = enc.apply(variables, batch.graph)
  assert len(out.node_states) == 4
  x, edges = enc.apply(variables, batch.graph, method=pronet.ProNet.embed)
  np.testing.assert_array_equal(x, out.node_states[0])
  for k in range(3):
    x = enc.apply(variables, k, x, edges, batch.graph, method=pronet.ProNet.block)
    np.testing.assert_allclose(x, out.node_states[k + 1], atol=1e-6)

  class Parent(nn.Module):
    def setup(self):
      self.gnn = pronet.ProNet(enc.config)

    def __call__(self, graph):
      x, edges = self.gnn.embed(graph)
      for k in range(3):
        x = self.gnn.block(k, x, edges, graph)
      return x

  parent = Parent()
  parent_vars = parent.init(jax.random.PRNGKey(0), batch.graph)
  parent_out = parent.apply({"params": {"gnn": variables["params"]}}, batch.graph)
  assert jax.tree_util.tree_structure(parent_vars["params"]["gnn"]) == \
      jax.tree_util.tree_structure(variables["params"])
  np.testing.assert_allclose(parent_out, out.nodes, atol=1e-6)


def test_augmentation_only_when_not_deterministic():
  batch = _collate([testing.random_example(20, seed=10, n_ligand=2)])
  enc = _encoder("amino_acid", dropout=0.0, mask_aatype_prob=1.0)
  variables = _init(enc, batch.graph)
  rngs = {"dropout": jax.random.PRNGKey(2)}
  masked = enc.apply(variables, batch.graph, deterministic=False, rngs=rngs).nodes
  nodes = dict(batch.graph.nodes)
  kind = np.asarray(nodes["node_kind"])
  nodes["aatype"] = np.where(kind == 0, 25, nodes["aatype"])  # ligand atoms untouched
  by_hand = enc.apply(variables, batch.graph._replace(nodes=nodes)).nodes
  np.testing.assert_allclose(masked, by_hand, atol=1e-6)

  noisy = _encoder("backbone", dropout=0.0, coord_noise_std=0.1)
  variables = _init(noisy, batch.graph)
  clean = noisy.apply(variables, batch.graph).nodes
  again = noisy.apply(variables, batch.graph, deterministic=True, rngs=rngs).nodes
  moved = noisy.apply(variables, batch.graph, deterministic=False, rngs=rngs).nodes
  np.testing.assert_array_equal(clean, again)
  assert np.abs(np.asarray(moved) - np.asarray(clean)).max() > 1e-4


def test_extra_node_features_are_projected_and_added():
  batch = _collate([testing.random_example(12, seed=11)])
  enc = _encoder("backbone")
  extra = jnp.ones((batch.graph.nodes["aatype"].shape[0], 5))
  variables = enc.init(jax.random.PRNGKey(0), batch.graph, extra_node_features=extra)
  x_plain, _ = enc.apply(variables, batch.graph, method=pronet.ProNet.embed)
  x_extra, _ = enc.apply(variables, batch.graph, extra_node_features=extra,
                         method=pronet.ProNet.embed)
  dense = variables["params"]["extra_embed"]
  np.testing.assert_allclose(x_extra - x_plain, extra @ dense["kernel"] + dense["bias"],
                             atol=1e-5)


# --- learning --------------------------------------------------------------------------

@pytest.mark.slow
def test_learns_secondary_structure_from_structure():
  train = _dssp_examples(["1ahsA", "1bvyF", "1eteA", "1or4A", "2a2lA", "3e8mA", "1dx5I",
                          "1h4aX", "1i8nA", "1lpbA"])
  held_out = _dssp_examples(["2cayA", "3gknA"])
  train_batch, test_batch = _collate(train), _collate(held_out)
  enc = _encoder("amino_acid", hidden=32, num_blocks=2, dropout=0.0)

  class Tagger(nn.Module):
    @nn.compact
    def __call__(self, graph, deterministic=True):
      return nn.Dense(3)(enc.copy(name="gnn")(graph, deterministic=deterministic).nodes)

  model = Tagger()
  params = model.init(jax.random.PRNGKey(0), train_batch.graph)["params"]
  tx = optax.adam(2e-3)
  opt_state = tx.init(params)

  def loss_fn(params, batch):
    logits = model.apply({"params": params}, batch.graph)
    labels = jnp.asarray(batch.node_labels, jnp.int32)
    weight = jnp.asarray(batch.node_label_mask)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    acc = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return jnp.sum(loss * weight) / weight.sum(), jnp.sum(acc * weight) / weight.sum()

  @jax.jit
  def step(params, opt_state):
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, train_batch)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  evaluate = jax.jit(loss_fn)
  first_loss, _ = evaluate(params, train_batch)
  _, first_acc = evaluate(params, test_batch)
  # Measured: train loss under 0.1x its start from step ~35 and ~0 from step ~70,
  # held-out accuracy over 0.8 from step ~20 (0.84 at 80 steps, 0.85 at 150).
  for _ in range(80):
    params, opt_state, _ = step(params, opt_state)
  train_loss, _ = evaluate(params, train_batch)
  _, test_acc = evaluate(params, test_batch)
  # Held-out loss is not asserted: 10 chains are memorised and the logits grow
  # overconfident; held-out accuracy shows what was learnt (majority ~0.4).
  assert float(train_loss) < 0.1 * float(first_loss)
  assert float(test_acc) > 0.75 > float(first_acc)
