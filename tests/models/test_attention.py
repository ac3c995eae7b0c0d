"""The shared masked attention against the plain formula: values, gradients, edge rows."""

import jax
import jax.numpy as jnp
import numpy as np

from bihier_jax.models import attention


def _plain(q, k, v, bias):
  logits = jnp.einsum("bqhc,bkhc->bhqk", q, k) + bias
  return jnp.einsum("bhqk,bkhc->bqhc", jax.nn.softmax(logits, axis=-1), v)


def _inputs(seed, shape=(2, 7, 3, 4), pairs=True):
  rng = np.random.default_rng(seed)
  q, k, v, g = (jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(4))
  b, t = shape[:2]
  allowed = rng.random((b, 1, t, t) if pairs else (b, 1, 1, t)) < 0.6
  allowed[..., 0] = True
  return q, k, v, g, attention.mask_bias(allowed)


def test_values_and_gradients_equal_autodiff_of_the_formula():
  for pairs in (True, False):
    q, k, v, g, bias = _inputs(4, pairs=pairs)
    want, want_vjp = jax.vjp(lambda q, k, v: _plain(q, k, v, bias), q, k, v)
    got, got_vjp = jax.vjp(lambda q, k, v: attention.masked_attention(q, k, v, bias), q, k, v)
    # The undifferentiated call takes the late-normalisation path; compare it too.
    primal = attention.masked_attention(q, k, v, bias)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(primal, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(got_vjp(g), want_vjp(g)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_mask_bias():
  allowed = np.array([[True, False], [False, True]])
  bias = attention.mask_bias(allowed)
  assert bias.dtype == jnp.float32
  np.testing.assert_array_equal(bias, [[0.0, attention.MASKED_LOGIT],
                                       [attention.MASKED_LOGIT, 0.0]])
  assert np.isfinite(attention.MASKED_LOGIT) and attention.MASKED_LOGIT < -1e38


def test_row_without_allowed_keys_is_finite_and_isolated():
  q, k, v, g, _ = _inputs(5, pairs=False)
  key_mask = np.ones((2, 7), bool)
  key_mask[1] = False  # a batch row of only padding
  bias = attention.mask_bias(key_mask)[:, None, None, :]
  out, vjp = jax.vjp(lambda q, k, v: attention.masked_attention(q, k, v, bias), q, k, v)
  assert np.isfinite(np.asarray(out)).all()
  assert all(np.isfinite(np.asarray(d)).all() for d in vjp(g))
  np.testing.assert_allclose(out[0], _plain(q, k, v, jnp.zeros_like(bias))[0], rtol=1e-5,
                             atol=1e-6)


def test_bfloat16_inputs_stay_close_to_float32():
  q, k, v, _, bias = _inputs(6, shape=(2, 16, 2, 8))
  want = attention.masked_attention(q, k, v, bias)
  low = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  got = attention.masked_attention(*low, bias)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=5e-2)


def test_cpu_key_padding_at_multiples_of_256_keeps_the_result():
  """Keys a multiple of 256 long take the padded path when differentiated on CPU: same
  values and gradients as the plain formula, and the padded keys really are in the
  program (the undifferentiated forward has none)."""
  q, k, v, g, bias = _inputs(7, shape=(1, 256, 2, 4), pairs=False)
  attend = lambda q, k, v: attention.masked_attention(q, k, v, bias)
  want, want_vjp = jax.vjp(lambda q, k, v: _plain(q, k, v, bias), q, k, v)
  got, got_vjp = jax.vjp(attend, q, k, v)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  for a, b in zip(got_vjp(g), want_vjp(g)):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  assert jax.default_backend() == "cpu"
  loss = lambda q, k, v: jnp.sum(attend(q, k, v) * g)
  assert "264" in str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v))
  assert "264" not in str(jax.make_jaxpr(attend)(q, k, v))


def _packed_ids(seed, rows=3, length=512):
  """Random packed rows: chains of 5-299 tokens back to back, then padding (-1)."""
  rng = np.random.default_rng(seed)
  ids = np.full((rows, length), -1, np.int32)
  for r in range(rows):
    col, chain = 0, 0
    while True:
      n = int(rng.integers(5, 300))
      if col + n > length - 40 * r:
        break
      ids[r, col:col + n] = chain
      chain, col = chain + 1, col + n
  return ids


def test_segment_windows_hold_every_key_of_the_blocks_chains():
  ids = _packed_ids(1)
  widths, starts = map(np.asarray, jax.jit(attention.segment_windows, static_argnums=1)(
      jnp.asarray(ids), 128))
  for r in range(ids.shape[0]):
    for i in range(ids.shape[1] // 128):
      chains = set(ids[r, i * 128:(i + 1) * 128]) - {-1}
      lo, width = starts[r, i], widths[r, i] * 128
      needed = np.flatnonzero(np.isin(ids[r], list(chains)))
      if not chains:
        assert width == 0
        continue
      assert lo <= needed.min() and needed.max() < lo + width <= ids.shape[1]
      assert width - 128 < needed.max() + 1 - needed.min()  # the narrowest multiple


def test_segment_attention_equals_masked_attention_with_a_chain_mask():
  ids = _packed_ids(2)
  rng = np.random.default_rng(3)
  q, k, v, g = (jnp.asarray(rng.normal(size=ids.shape + (2, 8)), jnp.float32)
                for _ in range(4))
  allowed = (ids[:, None, :, None] == ids[:, None, None, :]) & (ids >= 0)[:, None, None, :]
  real = (ids >= 0)[:, :, None, None]
  dense = lambda q, k, v: attention.masked_attention(q, k, v, attention.mask_bias(allowed)) * real
  windows = lambda q, k, v: attention.segment_attention(q, k, v, ids, 128)
  want, want_vjp = jax.vjp(dense, q, k, v)
  got = jax.jit(windows)(q, k, v)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(got)[~np.broadcast_to(real, got.shape)] == 0)
  primal, got_vjp = jax.vjp(windows, q, k, v)
  np.testing.assert_allclose(primal, want, rtol=1e-5, atol=1e-5)
  # The windowed backward against the dense closed form (and so against autodiff of
  # the whole-row softmax, which tests/models/test_attention.py checks above).
  for a, b in zip(jax.jit(got_vjp)(g), want_vjp(g)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # A chain's output depends on its own tokens only.
  k2 = np.asarray(k).copy()
  k2[0, ids[0] == 1] += 1.0
  moved = np.asarray(jax.jit(windows)(q, jnp.asarray(k2), v))
  np.testing.assert_array_equal(moved[0, ids[0] != 1], np.asarray(got)[0, ids[0] != 1])


def test_segment_attention_runs_inside_shard_map():
  """Evaluation calls it per device under shard_map: every window branch must carry the
  batch's device-varying type (a constant zeros branch did not)."""
  ids = _packed_ids(4, rows=2, length=256)
  ids[1, 128:] = -1  # a block of padding only
  q = jnp.asarray(np.random.default_rng(5).normal(size=ids.shape + (2, 8)), jnp.float32)
  mesh = jax.make_mesh((1,), ("data",))
  spec = jax.sharding.PartitionSpec("data")
  def attend(q, ids):
    return attention.segment_attention(q, q, q, ids)
  def grad(q, ids):  # training steps differentiate it per device too
    return jax.grad(lambda q: jnp.sum(jnp.sin(attend(q, ids))))(q)
  on_mesh = lambda x: jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))
  for fn in (attend, grad):
    sharded = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec), out_specs=spec))
    np.testing.assert_allclose(sharded(on_mesh(q), on_mesh(jnp.asarray(ids))),
                               jax.jit(fn)(q, jnp.asarray(ids)), rtol=1e-6, atol=1e-6)
