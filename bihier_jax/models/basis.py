"""Spherical basis of ProNet's edge features (`SphericalBasis`): spherical Bessel radial
functions times real spherical harmonics, as the reference computes them (DIG
`dig/threedgraph/method/pronet/features.py`, after GemNet / DimeNet), no deviations.
Every constant (zeros, normalisers, harmonic prefactors, series coefficients) is
computed once in numpy/scipy when a `SphericalBasis` is built; the jnp functions only
evaluate closed forms and recurrences and are safe (finite values and gradients) at
d = 0, which padding self-loops produce. The formulas and the expansion order:
docs/model.md "ProNet".
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
from scipy import optimize
from scipy import special

# Below this argument j_l uses its power series: the upward recurrence divides by x.
_SERIES_THRESHOLD = 1.0
_SERIES_TERMS = 6


def spherical_bessel_zeros(num_spherical: int, num_radial: int) -> np.ndarray:
  """First positive zeros of the spherical Bessel functions j_0..j_{L-1}.

  Zeros of j_l interlace those of j_{l-1}, so each is bracketed by two consecutive zeros
  of the previous order (j_0's are nπ).

  Returns:
    float64[L, K], row l = first K positive zeros of j_l.
  """
  if num_spherical < 1 or num_radial < 1:
    raise ValueError(f"need num_spherical, num_radial >= 1, got {num_spherical}, "
                     f"{num_radial}")
  count = num_radial + num_spherical - 1  # later orders need one bracket fewer each
  brackets = np.arange(1, count + 1) * np.pi
  zeros = np.zeros((num_spherical, num_radial))
  zeros[0] = brackets[:num_radial]
  for order in range(1, num_spherical):
    roots = np.array([
        optimize.brentq(lambda x: special.spherical_jn(order, x), lo, hi, xtol=1e-14)
        for lo, hi in zip(brackets[:-1], brackets[1:])])
    zeros[order] = roots[:num_radial]
    brackets = roots
  return zeros


def _double_factorial(n: int) -> int:
  return math.prod(range(n, 0, -2)) if n > 0 else 1


@dataclasses.dataclass(frozen=True)
class SphericalBasis:
  """Constants of the (d, θ, φ) and (d, angle) expansions.

  Attributes:
    num_spherical: L, degrees 0..L-1.
    num_radial: K, radial frequencies per degree.
    cutoff: Å, distance at which every radial function has a zero.
    zeros: float32[L, K] zeros z_ln of j_l.
    radial_norm: float32[L, K] 1 / sqrt(j_{l+1}(z_ln)² / 2).
    harmonic_norm: float64[L, L] sqrt((2l+1)/(4π) · (l−m)!/(l+m)!) for 0 <= m <= l.
    series: float64[L, T] power-series coefficients of j_l(x) / x^l in x².
  """
  num_spherical: int
  num_radial: int
  cutoff: float
  zeros: np.ndarray
  radial_norm: np.ndarray
  harmonic_norm: np.ndarray
  series: np.ndarray

  @classmethod
  def build(cls, num_spherical: int, num_radial: int, cutoff: float) -> "SphericalBasis":
    if cutoff <= 0:
      raise ValueError(f"cutoff must be positive (Å), got {cutoff}")
    zeros = spherical_bessel_zeros(num_spherical, num_radial)
    radial_norm = np.stack([
        1.0 / np.sqrt(0.5 * special.spherical_jn(l + 1, zeros[l]) ** 2)
        for l in range(num_spherical)])
    harmonic_norm = np.zeros((num_spherical, num_spherical))
    for l in range(num_spherical):
      for m in range(l + 1):
        harmonic_norm[l, m] = math.sqrt(
            (2 * l + 1) / (4 * math.pi) * math.factorial(l - m) / math.factorial(l + m))
    # j_l(x) = x^l Σ_k (−x²/2)^k / (k! (2l+2k+1)!!)
    series = np.array([[(-0.5) ** k / (math.factorial(k) * _double_factorial(2 * l + 2 * k + 1))
                        for k in range(_SERIES_TERMS)] for l in range(num_spherical)])
    return cls(num_spherical, num_radial, float(cutoff), zeros.astype(np.float32),
               radial_norm.astype(np.float32), harmonic_norm, series)

  @property
  def theta_phi_size(self) -> int:
    """Width of `theta_phi_expansion`: L² · K."""
    return self.num_spherical ** 2 * self.num_radial

  @property
  def angle_size(self) -> int:
    """Width of `angle_expansion`: L · K."""
    return self.num_spherical * self.num_radial


def spherical_bessel(basis: SphericalBasis, order: int, x):
  """j_order(x), finite with finite gradients for every x >= 0.

  Args:
    basis: constants (power-series coefficients).
    order: l < L.
    x: [...] non-negative arguments.

  Returns:
    [...] like x.
  """
  small = x < _SERIES_THRESHOLD
  xs = jnp.where(small, x, 0.0)  # series branch never sees large x
  xl = jnp.where(small, 1.0, x)  # recurrence branch never sees tiny x (divides by x)
  x2 = xs * xs
  poly = sum(float(c) * x2 ** k for k, c in enumerate(basis.series[order]))
  series = xs ** order * poly
  sin, cos = jnp.sin(xl), jnp.cos(xl)
  prev, large = None, sin / xl  # j_0
  if order >= 1:
    prev, large = large, sin / (xl * xl) - cos / xl  # j_1
  for l in range(2, order + 1):  # j_l = (2l−1)/x j_{l−1} − j_{l−2}
    prev, large = large, (2 * l - 1) / xl * large - prev
  return jnp.where(small, series, large)


def radial_basis(basis: SphericalBasis, dist):
  """Normalised spherical Bessel radial functions rbf_ln(d).

  Args:
    basis: constants.
    dist: [...] distances in Å (>= 0).

  Returns:
    [..., L, K].
  """
  scaled = (dist / basis.cutoff)[..., None]
  rows = [spherical_bessel(basis, l, scaled * jnp.asarray(basis.zeros[l]))
          for l in range(basis.num_spherical)]
  return jnp.stack(rows, axis=-2) * jnp.asarray(basis.radial_norm)


def _legendre(basis: SphericalBasis, cos_t, sin_t):
  """Associated Legendre P_l^m(cos θ) for 0 <= m <= l < L (Condon–Shortley phase).

  Written with sin θ passed in (not sqrt(1 − cos²θ)), so gradients are finite at the poles.

  Returns:
    dict (l, m) -> [...].
  """
  legendre = {(0, 0): jnp.ones_like(cos_t)}
  for l in range(1, basis.num_spherical):
    legendre[(l, l)] = (1 - 2 * l) * sin_t * legendre[(l - 1, l - 1)]
    legendre[(l, l - 1)] = (2 * l - 1) * cos_t * legendre[(l - 1, l - 1)]
    for m in range(l - 1):
      legendre[(l, m)] = ((2 * l - 1) * cos_t * legendre[(l - 1, m)]
                          - (l + m - 1) * legendre[(l - 2, m)]) / (l - m)
  return legendre


def real_spherical_harmonics(basis: SphericalBasis, theta, phi):
  """Real spherical harmonics Y_lm(θ, φ), in the reference's order.

  Y_l0 = N_l0 P_l0, Y_lm = √2 (−1)^m N_lm P_lm cos(mφ), Y_l(−m) = √2 (−1)^m N_lm P_lm sin(mφ).

  Args:
    theta: [...] polar angle (radians).
    phi: [...] azimuth (radians).

  Returns:
    [..., L²], for each l: m = 0, 1..l, −l..−1.
  """
  legendre = _legendre(basis, jnp.cos(theta), jnp.sin(theta))
  out = []
  for l in range(basis.num_spherical):
    out.append(basis.harmonic_norm[l, 0] * legendre[(l, 0)])
    scale = [math.sqrt(2) * (-1) ** m * basis.harmonic_norm[l, m] * legendre[(l, m)]
             for m in range(1, l + 1)]
    out += [s * jnp.cos(m * phi) for m, s in enumerate(scale, start=1)]
    out += [scale[m - 1] * jnp.sin(m * phi) for m in range(l, 0, -1)]
  return jnp.stack(out, axis=-1)


def zonal_harmonics(basis: SphericalBasis, angle):
  """Y_l0(angle) for l < L (m = 0 only).

  Returns:
    [..., L].
  """
  legendre = _legendre(basis, jnp.cos(angle), jnp.sin(angle))
  return jnp.stack([basis.harmonic_norm[l, 0] * legendre[(l, 0)]
                    for l in range(basis.num_spherical)], axis=-1)


def theta_phi_expansion(basis: SphericalBasis, dist, theta, phi):
  """Expansion of (d, θ, φ): rbf_ln(d) · Y_lm(θ, φ).

  Args:
    dist: [...] Å; theta, phi: [...] radians.

  Returns:
    [..., L²·K], index ((l, m), n) with (l, m) in `real_spherical_harmonics` order.
  """
  rbf = radial_basis(basis, dist)  # [..., L, K]
  degree = np.repeat(np.arange(basis.num_spherical), 2 * np.arange(basis.num_spherical) + 1)
  sph = real_spherical_harmonics(basis, theta, phi)  # [..., L²]
  out = rbf[..., degree, :] * sph[..., None]
  return out.reshape(out.shape[:-2] + (basis.theta_phi_size,))


def angle_expansion(basis: SphericalBasis, dist, angle):
  """Expansion of (d, angle): rbf_ln(d) · Y_l0(angle).

  Returns:
    [..., L·K], index (l, n).
  """
  out = radial_basis(basis, dist) * zonal_harmonics(basis, angle)[..., None]
  return out.reshape(out.shape[:-2] + (basis.angle_size,))
