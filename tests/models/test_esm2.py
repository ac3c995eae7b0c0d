"""ESM-2 port against the original (fair-esm) and transformers, on small random models.

Budget: ~60 s on 2 busy cores (tiny configs; one jit per model shape).
"""

import os

os.environ.setdefault("USE_TF", "0")

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bihier_jax.common import residue_constants as rc
from bihier_jax.models import esm2
from bihier_jax.models.esm2 import checkpoint as esm2_checkpoint

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
esm = pytest.importorskip("esm")

HIDDEN_TOL = 1e-5
LOGIT_TOL = 1e-4

# Rows: 0 full length with <mask>; 1 padded, no <mask>; 2 padded AND <mask> (where
# transformers deviates from fair-esm); 3 padded, lowercase + unknown letter.
SEQUENCES = ["MKT<mask>YIAKQRQISFVKSHFS<mask>QLEERLGLIE", "ACDEFGHIKLMNPQRSTVWY",
             "MK<mask>LLV<mask>AGQW", "acdxjB"]
TRANSFORMERS_AGREE = [0, 1, 3]  # rows without (padding and <mask>) together

# (layers, width, heads): default-ish 4 heads and a non-default 5 heads of width 8.
SHAPES = [(2, 32, 4), (3, 40, 5)]


def _perturb_(module, seed):
  """Every torch parameter random (biases, LayerNorm too), except the zero <pad> row."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      p.copy_(0.1 * torch.randn(p.shape, generator=gen) + (1.0 if "norm" in name.lower()
                                                           and name.endswith("weight") else 0.0))
      if name.endswith(("word_embeddings.weight", "embed_tokens.weight")):
        p[rc.ESM_PAD] = 0.0
  return module


def hf_esm(layers, width, heads, seed=0):
  config = transformers.EsmConfig(
      vocab_size=33, hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
      intermediate_size=4 * width, position_embedding_type="rotary", token_dropout=True,
      emb_layer_norm_before=False, mask_token_id=rc.ESM_MASK, pad_token_id=rc.ESM_PAD,
      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layer_norm_eps=1e-5,
      max_position_embeddings=1026, attn_implementation="eager")
  torch.manual_seed(seed)
  return _perturb_(transformers.EsmForMaskedLM(config).eval(), seed)


def fair_esm(layers, width, heads, seed=0):
  torch.manual_seed(seed)
  alphabet = esm.Alphabet.from_architecture("ESM-1b")
  model = esm.model.esm2.ESM2(num_layers=layers, embed_dim=width, attention_heads=heads,
                              alphabet=alphabet, token_dropout=True)
  return _perturb_(model.eval(), seed)


def state_numpy(module):
  return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def run_port(cfg, params, tokens):
  fn = jax.jit(lambda p, t: esm2.ESM2(cfg).apply({"params": p}, t, return_mlm_logits=True))
  out = fn(params, jnp.asarray(tokens))
  return [np.asarray(h) for h in out.hidden_states], np.asarray(out.logits)


def max_abs(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# --- tokenizer -------------------------------------------------------------------------


def test_tokenize_matches_fair_esm_batch_converter():
  alphabet = esm.Alphabet.from_architecture("ESM-1b")
  # fair-esm knows neither lowercase nor unknown letters: the same rows spelled its way.
  spelled = SEQUENCES[:3] + ["ACDX<unk>B"]
  _, _, reference = alphabet.get_batch_converter()([(str(i), s) for i, s in enumerate(spelled)])
  ours = esm2.tokenize(SEQUENCES)
  assert ours.dtype == np.int32
  np.testing.assert_array_equal(ours, reference.numpy())


def test_tokenize_policy():
  tokens = esm2.tokenize(["acJ"], max_length=7)
  np.testing.assert_array_equal(
      tokens[0], [rc.ESM_CLS, rc.ESM_TOKEN["A"], rc.ESM_TOKEN["C"], rc.ESM_UNK, rc.ESM_EOS,
                  rc.ESM_PAD, rc.ESM_PAD])
  with pytest.raises(ValueError, match="exceed"):
    esm2.tokenize(["ACDEFG"], max_length=5)
  cropped = esm2.tokenize(["ACDEFG"], max_length=5, crop=True)
  np.testing.assert_array_equal(cropped[0], [0, 5, 23, 13, 2])
  with pytest.raises(ValueError, match="1024"):
    esm2.tokenize(["A" * 1023])
  assert esm2.tokenize(["A" * 1023], crop=True).shape == (1, 1024)


def test_presets_match_released_sizes():
  released = {"t6_8M": 7.5e6, "t12_35M": 33.5e6, "t30_150M": 148e6, "t33_650M": 651e6}
  for name, count in released.items():
    cfg = esm2.config_from_preset(name)
    # Our count excludes the contact head (a few hundred params); within 1 %.
    assert abs(esm2.num_params(cfg) - count) / count < 0.01, name
  assert esm2.config_from_preset("t12_35M", embed_dim=64, num_heads=4).ffn_dim == 256


# --- parity ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_parity_with_fair_esm(shape):
  layers, width, heads = shape
  ref = fair_esm(*shape)
  tokens = esm2.tokenize(SEQUENCES)
  with torch.no_grad():
    out = ref(torch.from_numpy(tokens).long(), repr_layers=list(range(layers + 1)))
  cfg = esm2.ESM2Config(num_layers=layers, embed_dim=width, num_heads=heads)
  params = esm2_checkpoint.params_from_torch(
      state_numpy(ref), cfg, esm2_checkpoint._FAIR_LAYER, esm2_checkpoint._FAIR_TOP,
      esm2_checkpoint._FAIR_IGNORED, "fair-esm")
  hidden, logits = run_port(cfg, params, tokens)
  assert len(hidden) == layers + 1
  for i, h in enumerate(hidden):
    assert max_abs(h, out["representations"][i].numpy()) <= HIDDEN_TOL, f"layer {i}"
  assert max_abs(logits, out["logits"].numpy()) <= LOGIT_TOL


@pytest.mark.parametrize("shape", SHAPES)
def test_parity_with_transformers_and_documented_deviation(shape):
  layers, width, heads = shape
  ref = hf_esm(*shape, seed=1)
  tokens = esm2.tokenize(SEQUENCES)
  mask = tokens != rc.ESM_PAD
  with torch.no_grad():
    out = ref(torch.from_numpy(tokens).long(), attention_mask=torch.from_numpy(mask).long(),
              output_hidden_states=True)
  cfg = esm2.ESM2Config(num_layers=layers, embed_dim=width, num_heads=heads)
  params = esm2_checkpoint.params_from_torch(
      {k[4:] if k.startswith("esm.") else k: v for k, v in state_numpy(ref).items()}, cfg,
      esm2_checkpoint._HF_LAYER, esm2_checkpoint._HF_TOP, esm2_checkpoint._HF_IGNORED, "hf")
  hidden, logits = run_port(cfg, params, tokens)
  ref_hidden = [h.numpy() for h in out.hidden_states]
  assert len(ref_hidden) == len(hidden) == layers + 1
  agree = TRANSFORMERS_AGREE
  for i, (h, r) in enumerate(zip(hidden, ref_hidden)):
    assert max_abs(h[agree], r[agree]) <= HIDDEN_TOL, f"layer {i}"
  assert max_abs(logits[agree], out.logits.numpy()[agree]) <= LOGIT_TOL

  # Row 2 (padded, with <mask>): transformers divides the <mask> count by the padded
  # length L instead of the real length n, i.e. its embeddings are ours times
  # (1 - m/n) / (1 - m/L). We follow fair-esm (checked in test_parity_with_fair_esm).
  row = 2
  m, n, length = (tokens[row] == rc.ESM_MASK).sum(), mask[row].sum(), tokens.shape[1]
  factor = (1 - m / n) / (1 - m / length)
  np.testing.assert_allclose(ref_hidden[0][row], hidden[0][row] * factor, atol=1e-6)
  assert max_abs(ref_hidden[-1][row][mask[row]], hidden[-1][row][mask[row]]) > 1e-3


# --- execution options -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
  cfg = esm2.config_from_preset("tiny")
  return cfg, esm2.init_params(cfg, seed=3), esm2.tokenize(SEQUENCES)


def test_scanned_unscanned_exact_agree(tiny):
  cfg, params, tokens = tiny
  base = esm2.ESM2(cfg).apply({"params": params}, tokens)
  for overrides in ({"scan_layers": False}, {"attention": "exact"}):
    other = esm2.ESM2(esm2.config_from_preset("tiny", **overrides)).apply(
        {"params": params}, tokens)
    for a, b in zip(base.hidden_states, other.hidden_states):
      assert max_abs(a, b) <= HIDDEN_TOL, overrides


def test_layer_ranges_compose_to_full_forward(tiny):
  cfg, params, tokens = tiny
  model, v = esm2.ESM2(cfg), {"params": params}
  full = model.apply(v, tokens)
  h = model.apply(v, tokens, method=esm2.ESM2.embed)
  assert max_abs(h, full.hidden_states[0]) == 0.0
  for start, stop in [(0, 1), (1, 1), (1, 3), (3, 4)]:
    h = model.apply(v, h, tokens, start, stop, method=esm2.ESM2.run_layers)
    if stop < cfg.num_layers:
      assert max_abs(h, full.hidden_states[stop]) <= HIDDEN_TOL
  h = model.apply(v, h, method=esm2.ESM2.final_norm)
  assert max_abs(h, full.last_hidden_state) <= HIDDEN_TOL
  with pytest.raises(ValueError, match="outside"):
    model.apply(v, h, tokens, 2, 5, method=esm2.ESM2.run_layers)


class _Interleaved(nn.Module):
  """A parent calling ESM2's range methods, as the fusion model does."""
  cfg: esm2.ESM2Config

  def setup(self):
    self.esm = esm2.ESM2(self.cfg)
    self.side = nn.Dense(self.cfg.embed_dim, kernel_init=nn.initializers.zeros)

  def __call__(self, tokens):
    h = self.esm.run_layers(self.esm.embed(tokens), tokens, 0, 2)
    h = h + self.side(h)  # zero-initialised: output equals the plain model at init
    return self.esm.final_norm(self.esm.run_layers(h, tokens, 2, self.cfg.num_layers))


def test_submodule_creates_every_param_and_matches(tiny):
  cfg, params, tokens = tiny
  parent = _Interleaved(cfg)
  variables = parent.init(jax.random.PRNGKey(0), tokens)
  shapes = jax.tree.map(jnp.shape, variables["params"]["esm"])
  assert shapes == jax.tree.map(jnp.shape, params)
  assert shapes["layers"]["qkv_proj"]["kernel"] == (4, 64, 192)
  variables["params"]["esm"] = params
  out = parent.apply(variables, tokens)
  ref = esm2.ESM2(cfg).apply({"params": params}, tokens).last_hidden_state
  assert max_abs(out, ref) <= HIDDEN_TOL


def test_remat_same_gradients_and_padding_rows_finite(tiny):
  cfg, params, tokens = tiny
  tokens = np.concatenate([tokens, np.full_like(tokens[:1], rc.ESM_PAD)])  # empty batch row

  def loss(p, remat):
    model = esm2.ESM2(esm2.config_from_preset("tiny", remat=remat))
    out = model.apply({"params": p}, tokens, return_mlm_logits=True, output_hidden_states=False)
    return jnp.mean(out.logits ** 2)

  g0 = jax.grad(loss)(params, False)
  g1 = jax.grad(loss)(params, True)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(g0))
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    assert max_abs(a, b) <= 1e-6


def test_bfloat16_compute_close_to_float32(tiny):
  cfg, params, tokens = tiny
  ref = esm2.ESM2(cfg).apply({"params": params}, tokens, output_hidden_states=False)
  out = esm2.ESM2(esm2.config_from_preset("tiny", dtype=jnp.bfloat16)).apply(
      {"params": params}, tokens, output_hidden_states=False)
  assert out.last_hidden_state.dtype == jnp.bfloat16
  err = max_abs(out.last_hidden_state.astype(jnp.float32), ref.last_hidden_state)
  assert 0 < err < 0.1  # bf16 has ~3 significant digits; LN output is O(1)
