"""Long chains read in overlapping ESM windows (`data.windows`): what the model does
with a windowed batch (`PaddingBudget.token_copies` > 1).

Tiny configs on proteins of 95 residues (two chains of 48 and 47) in windows of 30
residues, beside a 20-residue protein that fits one window.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bihier_jax import models
from bihier_jax import testing
from bihier_jax.data import layout
from bihier_jax.data import windows
from bihier_jax.models import bihier
from bihier_jax.models import esm2
from bihier_jax.models import tokens as tokens_lib
from configs import default
# XLA's CPU passes off for this module (autouse), as in test_bihier.
from tests.models.test_bihier import _fast_compiles  # noqa: F401  pylint: disable=unused-import

WINDOW = 30


def _examples():
  return [testing.random_example(95, seed=3, n_chains=2),
          testing.random_example(20, seed=4)]


@functools.lru_cache(maxsize=None)
def _model(kind):
  config = testing.tiny_config(default.get_config(), {"model.kind": kind, "model.fusion.levels": (1, 2)})
  model = models.build_model(config)
  batch = jax.tree_util.tree_map(jnp.asarray, layout.collate(
      _examples(), layout.budget_for(_examples(), window=WINDOW)))
  params = model.init(jax.random.PRNGKey(0), batch)["params"]
  forward = jax.jit(lambda p, b: model.apply({"params": p}, b,
                                             mutable=["intermediates"]))
  return config, params, forward


def test_each_residue_reads_esm_on_its_nearest_window_alone():
  """At init the write-back is zero, so the sequence stream is plain ESM-2: a residue's
  state is that of ESM-2 run on its window's `<cls> window <eos>` alone, at its place."""
  config, params, forward = _model("bihier")
  examples = _examples()
  batch = layout.collate(examples, layout.budget_for(examples, window=WINDOW))
  _, inter = forward(params, jax.tree_util.tree_map(jnp.asarray, batch))
  got = np.asarray(tokens_lib.gather_tokens(inter["intermediates"]["sequence_states"][0],
                                            jnp.asarray(batch.node_to_token)))
  esm = esm2.ESM2(bihier.BiHierConfig.from_config(config).esm)
  plain = jax.jit(lambda t: esm.apply({"params": params["esm"]}, t,
                                      output_hidden_states=False).last_hidden_state)
  node = 0
  for ex in examples:
    for c, seq in enumerate(ex.sequences):
      which, offset = windows.residue_windows(len(seq), WINDOW)
      starts = windows.window_starts(len(seq), WINDOW)
      states = [np.asarray(plain(esm2.tokenize([seq[s:s + WINDOW]])))[0] for s in starts]
      for i in ex.residue_index[ex.chain_row == c]:
        want = states[which[i, 0]][offset[i, 0] + 1]
        np.testing.assert_allclose(got[node], want, rtol=1e-5, atol=1e-5)
        node += 1


def test_every_copy_is_written_and_masked():
  examples = _examples()
  batch = layout.collate(examples, layout.budget_for(examples, window=WINDOW))
  n2t = batch.node_to_token
  values = np.arange(1, n2t.shape[0] + 1, dtype=np.float32)[:, None]
  grid = np.asarray(tokens_lib.scatter_to_tokens(values, n2t, batch.tokens.shape))
  hit = np.asarray(tokens_lib.mask_tokens(batch.tokens, n2t,
                                          np.ones(n2t.shape[0], bool))) == 32
  for node in np.flatnonzero(np.asarray(tokens_lib.has_token(n2t))):
    for row, col in n2t[node]:
      if row >= 0:
        assert grid[row, col, 0] == node + 1 and hit[row, col]
  assert hit.sum() == (n2t[..., 0] >= 0).sum()  # every copy, nothing else


@pytest.mark.parametrize("kind", ["bihier", "serial", "cross", "esm_only"])
def test_a_protein_that_fits_one_window_is_unchanged_in_a_windowed_batch(kind):
  """The short protein beside a windowed one gives what it gives in an ordinary batch
  (its map has one copy per residue); the long one gives finite outputs everywhere."""
  _, params, forward = _model(kind)
  long, short = _examples()
  windowed = layout.collate([long, short], layout.budget_for([long, short],
                                                             window=WINDOW))
  out, _ = forward(params, jax.tree_util.tree_map(jnp.asarray, windowed))
  alone = layout.collate([short], layout.budget_for([short]))
  _, _, forward_alone = _model(kind)
  ref, _ = forward_alone(params, jax.tree_util.tree_map(jnp.asarray, alone))
  logits = np.asarray(out.logits)
  n_long = long.num_residues
  np.testing.assert_allclose(logits[n_long:n_long + short.num_residues],
                             np.asarray(ref.logits)[:short.num_residues],
                             rtol=1e-4, atol=1e-5)
  assert np.isfinite(logits[:n_long]).all()
