"""Matmul FLOP counting against closed forms: GEMMs, their gradients, loops, branches,
convolutions, and the ESM-2 forward against its textbook count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bihier_jax.common import flops
from bihier_jax.common import residue_constants as rc
from bihier_jax.models import esm2

M, K, N = 6, 5, 7


def _x_w():
  return jnp.ones((M, K)), jnp.ones((K, N))


def test_one_gemm_is_two_flops_per_multiply_add():
  assert flops.matmul_flops(jnp.matmul, *_x_w()) == 2 * M * K * N


def test_gradient_adds_the_two_backward_gemms():
  loss = lambda x, w: jnp.sum(jnp.tanh(x @ w))
  # forward x·w, backward dx = g·wᵀ and dw = xᵀ·g: three GEMMs of the same size.
  grad = jax.value_and_grad(loss, argnums=(0, 1))
  assert flops.matmul_flops(grad, *_x_w()) == 3 * 2 * M * K * N
  # Only dx: dw is never formed.
  assert flops.matmul_flops(jax.grad(loss), *_x_w()) == 2 * 2 * M * K * N


def test_batched_attention_einsum():
  b, h, t, s, c = 2, 3, 4, 6, 5
  q, k = jnp.ones((b, h, t, c)), jnp.ones((b, h, s, c))
  fn = lambda q, k: jnp.einsum("bhqc,bhkc->bhqk", q, k)
  assert flops.matmul_flops(fn, q, k) == 2 * b * h * t * s * c


def test_scan_counts_every_trip_and_jit_is_seen_through():
  def body(carry, w):
    return jnp.tanh(carry @ w), None
  fn = jax.jit(lambda x, ws: jax.lax.scan(body, x, ws)[0])
  ws = jnp.ones((4, K, K))
  assert flops.matmul_flops(fn, jnp.ones((M, K)), ws) == 4 * 2 * M * K * K


def test_cond_counts_the_cheap_or_the_dear_branch():
  def fn(pred, x, w):
    return jax.lax.cond(pred, lambda: (x @ w) @ w.T, lambda: jnp.zeros((M, K)))
  args = (True, *_x_w())
  assert flops.matmul_flops(fn, *args) == 0
  assert flops.matmul_flops(fn, *args, cond_branch="max") == 2 * (2 * M * K * N)
  with pytest.raises(ValueError, match="cond_branch"):
    flops.matmul_flops(fn, *args, cond_branch="taken")


def test_shard_map_body_counts_once_per_device():
  spec = jax.sharding.PartitionSpec
  mesh = jax.sharding.AbstractMesh((4,), ("data",))  # no real devices needed to trace
  fn = jax.shard_map(jnp.matmul, mesh=mesh, in_specs=(spec("data"), spec()),
                     out_specs=spec("data"))
  x = jax.ShapeDtypeStruct((8, K), jnp.float32)  # 2 rows per device
  w = jax.ShapeDtypeStruct((K, N), jnp.float32)
  assert flops.matmul_flops(fn, x, w) == 2 * 8 * K * N


@pytest.mark.parametrize("groups", [1, 2])
def test_convolution(groups):
  n, c_in, c_out, height, width, kh, kw = 2, 4, 6, 9, 8, 3, 2
  x = jnp.ones((n, c_in, height, width))
  kernel = jnp.ones((c_out, c_in // groups, kh, kw))
  fn = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "VALID",
                                                 feature_group_count=groups)
  out_h, out_w = height - kh + 1, width - kw + 1
  expected = 2 * n * c_out * out_h * out_w * (c_in // groups) * kh * kw
  assert flops.matmul_flops(fn, x, kernel) == expected


def test_esm2_forward_matches_the_textbook_count():
  """Per layer: 2 FLOPs x tokens x matmul weights (q, k, v, o: 4 D²; FFN: 2 D F), plus
  attention scores and weighted sum, 2 x 2 L² D per row (summed over heads)."""
  cfg = esm2.config_from_preset("tiny", mlm_head=False)
  rows, length = 3, 12
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(4, 24, size=(rows, length)), jnp.int32)
  tokens = tokens.at[:, 0].set(rc.ESM_CLS).at[:, -1].set(rc.ESM_EOS)
  model = esm2.ESM2(cfg)
  params = model.init(jax.random.PRNGKey(0), tokens, output_hidden_states=False)
  forward = lambda p: model.apply(p, tokens, output_hidden_states=False)
  d, f = cfg.embed_dim, cfg.ffn_dim
  per_layer = (2 * rows * length * (4 * d * d + 2 * d * f)
               + 2 * 2 * rows * length * length * d)
  assert flops.matmul_flops(forward, params) == cfg.num_layers * per_layer


def test_peak_lookup_by_device_kind():
  class Device:
    def __init__(self, kind):
      self.device_kind = kind
  assert flops.peak_bf16_flops(Device("NVIDIA H100 80GB HBM3")) == 989e12
  assert flops.peak_bf16_flops(Device("NVIDIA H100 PCIe")) == 756e12
  assert flops.peak_bf16_flops(Device("cpu")) is None
