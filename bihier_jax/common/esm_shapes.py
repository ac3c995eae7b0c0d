"""ESM-2 sizes that the data layer needs before any model exists, in one home.

`ARCHITECTURES` (the released models by preset name, plus `tiny`), `Architecture`,
`architecture(name)` (a preset or an "L<layers>_D<width>_H<heads>_F<ffn>" name) and
`architecture_name`; `PALLAS_KINDS`, `PALLAS_BLOCK` and `pallas_row_multiple`, the block
the Pallas attention kernels need row lengths rounded to. `models/esm2/config.py` builds
`ESM2Config` from these; `data/budgets.py` reads them to choose row lengths.
Presets and attention kinds: docs/model.md "ESM-2".
"""

from __future__ import annotations

import re
from typing import NamedTuple


class Architecture(NamedTuple):
  """The shape of an ESM-2 trunk: layers, width D, heads, FFN width F."""
  num_layers: int
  embed_dim: int
  num_heads: int
  ffn_dim: int


# Released ESM-2 models (Lin et al. 2023, fair-esm README); F = 4 D in every one.
ARCHITECTURES: dict[str, Architecture] = {
    "t6_8M": Architecture(6, 320, 20, 1280),
    "t12_35M": Architecture(12, 480, 20, 1920),
    "t30_150M": Architecture(30, 640, 20, 2560),
    "t33_650M": Architecture(33, 1280, 20, 5120),
    "t36_3B": Architecture(36, 2560, 40, 10240),
    "t48_15B": Architecture(48, 5120, 40, 20480),
    # Not released: a small random model for demos and tests.
    "tiny": Architecture(4, 64, 4, 256),
}

# An architecture that is no preset (a checkpoint of another size), e.g. "L3_D48_H4_F96".
_NAMED = re.compile(r"L(\d+)_D(\d+)_H(\d+)_F(\d+)")


def architecture(name: str) -> Architecture:
  """The architecture of a preset name or an "L<n>_D<d>_H<h>_F<f>" name.

  Raises:
    ValueError: neither (the message lists the presets).
  """
  if name in ARCHITECTURES:
    return ARCHITECTURES[name]
  match = _NAMED.fullmatch(str(name))
  if not match:
    raise ValueError(f"unknown ESM-2 preset {name!r}; known: {sorted(ARCHITECTURES)} or "
                     "L<layers>_D<width>_H<heads>_F<ffn width> (e.g. L3_D48_H4_F96)")
  return Architecture(*(int(g) for g in match.groups()))


def architecture_name(arch: Architecture) -> str:
  """The preset with this architecture, else its "L<n>_D<d>_H<h>_F<f>" name."""
  for name, preset in ARCHITECTURES.items():
    if preset == tuple(arch):
      return name
  return "L{}_D{}_H{}_F{}".format(*arch)


PALLAS_KINDS = ("splash", "flash_gpu")
# Query and key block of both Pallas kernels: their rows are padded to a multiple of it,
# and the data pipeline chooses such row lengths for these kinds.
PALLAS_BLOCK = 128


def pallas_row_multiple(kind: str) -> int:
  """The multiple ESM row lengths are rounded up to for `model.esm.attention=kind`:
  `PALLAS_BLOCK` for the Pallas kinds, else 1."""
  return PALLAS_BLOCK if kind in PALLAS_KINDS else 1
