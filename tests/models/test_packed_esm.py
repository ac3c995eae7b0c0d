"""Packed ESM-2 rows: several chains per row, each attending only to itself.

A row holds chains back to back (`<cls> seq <eos>` each) with per-token segment ids:
attention stays inside a chain, rotary positions restart per chain, token dropout's
observed-mask ratio is per chain. Checked against transformers' `EsmModel` run on each
chain alone (no padding, so the two references agree even with `<mask>`), against the
one-chain-per-row layout (values and gradients), and for isolation between chains.
"""

import dataclasses
import os

os.environ.setdefault("USE_TF", "0")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bihier_jax.common import residue_constants as rc
from bihier_jax.models import attention_backends
from bihier_jax.models import esm2
from bihier_jax.models.esm2 import checkpoint as esm2_checkpoint

torch = pytest.importorskip("torch")
from tests.models import test_esm2  # pylint: disable=wrong-import-position  # the random torch models

TOL = 1e-5
LAYERS, WIDTH, HEADS = 2, 32, 4
# Two rows: chains 0 and 1 (with <mask>) packed into row 0, chains 2 and 3 into row 1,
# then padding; chain 4 alone in row 2 with padding.
CHAINS = ["MKT<mask>YIAKQRQISF", "ACDEF<mask>HIK", "LMNPQRSTVWY", "GGS<mask>", "MKLLVAGQW"]
ROWS = [[0, 1], [2, 3], [4]]
LENGTH = 32


def _tokens(sequence):
  return esm2.tokenize([sequence])[0]


def packed_rows(chains=CHAINS, length=LENGTH):
  """tokens int32[R, length], segments int32[R, length], spans [(row, start, stop)]."""
  tokens = np.full((len(ROWS), length), rc.ESM_PAD, np.int32)
  segments = np.full((len(ROWS), length), -1, np.int32)
  spans = [None] * len(chains)
  for r, members in enumerate(ROWS):
    at = 0
    for s, c in enumerate(members):
      t = _tokens(chains[c])
      tokens[r, at:at + len(t)] = t
      segments[r, at:at + len(t)] = s
      spans[c] = (r, at, at + len(t))
      at += len(t)
    segments[r, at:] = len(members)  # padding: a segment of its own
  return tokens, segments, spans


@pytest.fixture(scope="module")
def model():
  ref = test_esm2.hf_esm(LAYERS, WIDTH, HEADS, seed=3)
  cfg = esm2.ESM2Config(num_layers=LAYERS, embed_dim=WIDTH, num_heads=HEADS)
  state = {k[4:] if k.startswith("esm.") else k: v
           for k, v in test_esm2.state_numpy(ref).items()}
  params = esm2_checkpoint.params_from_torch(
      state, cfg, esm2_checkpoint._HF_LAYER, esm2_checkpoint._HF_TOP,
      esm2_checkpoint._HF_IGNORED, "hf")

  @jax.jit
  def hidden(params, tokens, segments):
    out = esm2.ESM2(cfg).apply({"params": params}, tokens, segments=segments)
    return jnp.stack(out.hidden_states)  # [S + 1, R, L, D]
  return ref, cfg, params, hidden


# 256-token rows take the CPU's windowed packed attention (attention.segment_attention),
# forward and backward.
ROW_LENGTHS = [LENGTH, 256]


@pytest.mark.parametrize("length", ROW_LENGTHS)
def test_packed_chains_equal_transformers_on_each_chain_alone(model, length):
  ref, _, params, hidden = model
  tokens, segments, spans = packed_rows(length=length)
  got = np.asarray(hidden(params, tokens, segments))
  for c, (r, start, stop) in enumerate(spans):
    alone = _tokens(CHAINS[c])[None]
    with torch.no_grad():
      out = ref(torch.from_numpy(alone).long(), output_hidden_states=True)
    for layer, want in enumerate(out.hidden_states):
      np.testing.assert_allclose(got[layer, r, start:stop], want.numpy()[0], atol=TOL,
                                 rtol=0, err_msg=f"chain {c} layer {layer}")


@pytest.mark.parametrize("length", ROW_LENGTHS)  # 256: the windowed backward too
def test_packed_equals_one_chain_per_row_with_gradients(model, length):
  _, cfg, params, hidden = model
  tokens, segments, spans = packed_rows(length=length)
  unpacked = esm2.tokenize(CHAINS, max_length=LENGTH)
  np.testing.assert_array_equal(hidden(params, unpacked, None).shape[1], len(CHAINS))

  def per_chain_loss(params, tokens, segments, chain_slices):
    # A fixed random readout of every chain's final states: one number per layout.
    h = esm2.ESM2(cfg).apply({"params": params}, tokens, segments=segments,
                             output_hidden_states=False).last_hidden_state
    w = jnp.asarray(np.random.default_rng(0).normal(size=(LENGTH, WIDTH)), jnp.float32)
    return sum(jnp.sum(h[r, a:b] * w[:b - a]) for r, a, b in chain_slices)

  packed_slices = tuple(spans)
  unpacked_slices = tuple((c, 0, stop - start) for c, (_, start, stop) in enumerate(spans))
  grad = jax.grad(per_chain_loss)
  g_packed = grad(params, tokens, segments, packed_slices)
  g_unpacked = grad(params, unpacked, None, unpacked_slices)
  for a, b in zip(jax.tree_util.tree_leaves(g_packed), jax.tree_util.tree_leaves(g_unpacked)):
    np.testing.assert_allclose(a, b, atol=TOL, rtol=1e-4)
  h_packed = np.asarray(hidden(params, tokens, segments))
  h_unpacked = np.asarray(hidden(params, unpacked, None))
  for c, (r, start, stop) in enumerate(spans):
    np.testing.assert_allclose(h_packed[:, r, start:stop], h_unpacked[:, c, :stop - start],
                               atol=TOL, rtol=0)


@pytest.mark.parametrize("length", ROW_LENGTHS)
def test_a_chain_never_sees_its_row_neighbours(model, length):
  """Changing chain 1's tokens leaves chain 0 (same row) bit-identical."""
  _, _, params, hidden = model
  tokens, segments, spans = packed_rows(length=length)
  other = list(CHAINS)
  other[1] = "WWWWW<mask>WWW"  # same length, other residues and mask position
  tokens2, segments2, _ = packed_rows(other, length=length)
  np.testing.assert_array_equal(segments, segments2)
  a = np.asarray(hidden(params, tokens, segments))
  b = np.asarray(hidden(params, tokens2, segments2))
  r, start, stop = spans[0]
  np.testing.assert_array_equal(a[:, r, start:stop], b[:, r, start:stop])
  r, start, stop = spans[1]
  assert np.abs(a[-1, r, start:stop] - b[-1, r, start:stop]).max() > 1e-2


def test_segment_positions_restart_per_chain():
  _, segments, spans = packed_rows()
  positions = np.asarray(attention_backends.segment_positions(jnp.asarray(segments)))
  for r, start, stop in spans:
    np.testing.assert_array_equal(positions[r, start:stop], np.arange(stop - start))


@pytest.mark.parametrize("kind", ["splash", "flash_gpu"])
def test_segment_id_kernels_equal_exact_on_packed_rows(model, kind):
  """The TPU path (Pallas splash attention) and the GPU flash kernel (Pallas Triton
  attention), both with segment ids and interpreted on CPU, give the exact attention's
  states and gradients on packed rows (128-token rows: the kernels' block size)."""
  _, cfg, params, _ = model
  tokens, segments, spans = packed_rows(length=128)

  def run(kind):
    model = esm2.ESM2(dataclasses.replace(cfg, attention=kind))
    def loss(params):
      h = model.apply({"params": params}, tokens, segments=segments,
                      output_hidden_states=False).last_hidden_state
      return jnp.sum(jnp.sin(h) * (tokens != rc.ESM_PAD)[..., None]), h
    (_, h), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return np.asarray(h), g

  h_splash, g_splash = run(kind)
  h_exact, g_exact = run("exact")
  for r, start, stop in spans:
    np.testing.assert_allclose(h_splash[r, start:stop], h_exact[r, start:stop],
                               atol=TOL, rtol=0)
  for a, b in zip(jax.tree_util.tree_leaves(g_splash), jax.tree_util.tree_leaves(g_exact)):
    np.testing.assert_allclose(a, b, atol=TOL, rtol=1e-4)
