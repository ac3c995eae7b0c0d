"""Spherical basis constants and functions vs scipy (budget: ~5 s)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate
from scipy import special

from bihier_jax.models import basis as basis_lib


@pytest.fixture(scope="module")
def basis():
  return basis_lib.SphericalBasis.build(num_spherical=4, num_radial=6, cutoff=10.0)


def test_bessel_zeros_are_zeros(basis):
  np.testing.assert_allclose(basis.zeros[0], np.pi * np.arange(1, 7), rtol=1e-6)
  np.testing.assert_allclose(basis.zeros[1, :2], [4.493409457909064, 7.725251836937707],
                             rtol=1e-6)  # tabulated zeros of j_1
  for l in range(4):
    values = special.spherical_jn(l, basis.zeros[l].astype(np.float64))
    np.testing.assert_allclose(values, 0.0, atol=1e-6)
    assert np.all(np.diff(basis.zeros[l]) > 2.5)  # distinct, consecutive zeros
  assert np.all(basis.zeros[1:, 0] > basis.zeros[:-1, 0])  # first zero grows with order


def test_spherical_bessel_matches_scipy(basis):
  x = np.linspace(0.0, 30.0, 3001)
  for l in range(4):
    ours = np.asarray(basis_lib.spherical_bessel(basis, l, jnp.asarray(x, jnp.float32)))
    np.testing.assert_allclose(ours, special.spherical_jn(l, x), atol=2e-6)
    grad = jax.vmap(jax.grad(lambda t: basis_lib.spherical_bessel(basis, l, t)))(
        jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(np.asarray(grad), special.spherical_jn(l, x, derivative=True),
                               atol=2e-5)


def test_radial_functions_are_orthonormal_on_unit_ball(basis):
  # ∫_0^1 rbf_ln(x) rbf_ln'(x) x² dx = δ_nn' for d = x·cutoff (Simpson on a fine grid).
  x = np.linspace(0.0, 1.0, 20001)
  rbf = np.asarray(basis_lib.radial_basis(basis, jnp.asarray(x * basis.cutoff, jnp.float32)),
                   np.float64)  # [x, L, K]
  for l in range(basis.num_spherical):
    gram = integrate.simpson(rbf[:, l, :, None] * rbf[:, l, None, :] * (x * x)[:, None, None],
                             x=x, axis=0)
    np.testing.assert_allclose(gram, np.eye(basis.num_radial), atol=2e-4)


def _scipy_real_harmonics(l_max, theta, phi):
  out = []
  for l in range(l_max):
    out.append(special.sph_harm_y(l, 0, theta, phi).real)
    for m in range(1, l + 1):
      out.append(np.sqrt(2) * (-1) ** m * special.sph_harm_y(l, m, theta, phi).real)
    for m in range(l, 0, -1):
      out.append(np.sqrt(2) * (-1) ** m * special.sph_harm_y(l, m, theta, phi).imag)
  return np.stack(out, -1)


def test_real_spherical_harmonics_match_scipy(basis):
  rng = np.random.default_rng(0)
  theta = rng.uniform(0, np.pi, 200)
  phi = rng.uniform(-np.pi, np.pi, 200)
  ours = basis_lib.real_spherical_harmonics(basis, jnp.asarray(theta), jnp.asarray(phi))
  np.testing.assert_allclose(np.asarray(ours), _scipy_real_harmonics(4, theta, phi),
                             atol=1e-5)
  zonal = basis_lib.zonal_harmonics(basis, jnp.asarray(theta))
  np.testing.assert_allclose(np.asarray(zonal),
                             _scipy_real_harmonics(4, theta, phi)[:, [0, 1, 4, 9]], atol=1e-5)


def test_expansions_layout_and_padding_safety():
  basis = basis_lib.SphericalBasis.build(num_spherical=2, num_radial=6, cutoff=10.0)
  assert (basis.theta_phi_size, basis.angle_size) == (24, 12)
  dist, theta, phi = 6.5, 1.1, -2.0
  ours = np.asarray(basis_lib.theta_phi_expansion(
      basis, jnp.float32(dist), jnp.float32(theta), jnp.float32(phi)))
  harmonics = _scipy_real_harmonics(2, theta, phi)  # (l, m): (0,0), (1,0), (1,1), (1,-1)
  degree = [0, 1, 1, 1]
  expected = [basis.radial_norm[degree[lm], n]
              * special.spherical_jn(degree[lm], basis.zeros[degree[lm], n] * dist / 10.0)
              * harmonics[lm] for lm in range(4) for n in range(6)]
  np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-6)

  angle = 0.7
  ours = np.asarray(basis_lib.angle_expansion(basis, jnp.float32(dist), jnp.float32(angle)))
  zonal = _scipy_real_harmonics(2, angle, 0.0)[[0, 1]]
  expected = [basis.radial_norm[l, n]
              * special.spherical_jn(l, basis.zeros[l, n] * dist / 10.0) * zonal[l]
              for l in range(2) for n in range(6)]
  np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-6)

  # Padding self-loops have d = 0: values and gradients stay finite.
  grads = jax.grad(lambda d: basis_lib.theta_phi_expansion(basis, d, 0.0, 0.0).sum()
                   + basis_lib.angle_expansion(basis, d, 0.0).sum())(0.0)
  assert np.isfinite(grads)
