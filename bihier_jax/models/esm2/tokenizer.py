"""ESM-2 tokens of amino-acid text: `tokenize` (`<cls> seq <eos> <pad>...`, the rows
fair-esm's batch converter makes). Residue letters read through
`residue_constants.esm_token_ids`; text may spell special tokens inline (`<mask>`).
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from bihier_jax.common import residue_constants as rc

_SPECIAL = re.compile(r"<[a-z_0-9]+>")


def _residue_ids(text: str) -> np.ndarray:
  """int32 ids of residue letters; a character outside the vocabulary is <unk> here
  (the data pipeline's `esm_token_ids` reads it as X)."""
  ids = rc.esm_token_ids(text).astype(np.int32)
  letters = np.frombuffer(text.upper().encode("ascii", "replace"), np.uint8)
  return np.where((ids == rc.ESM_TOKEN["X"]) & (letters != ord("X")), rc.ESM_UNK, ids)


def _tokenize_one(sequence: str) -> np.ndarray:
  """Token ids of one sequence, without <cls>/<eos>.

  Residue letters are case-insensitive; '<mask>' and the other special tokens may be
  written inline; any other character not in the vocabulary becomes <unk>.
  """
  ids = []
  pos = 0
  for match in _SPECIAL.finditer(sequence):
    ids.append(_residue_ids(sequence[pos:match.start()]))
    ids.append(np.array([rc.ESM_TOKEN.get(match.group(), rc.ESM_UNK)], np.int32))
    pos = match.end()
  ids.append(_residue_ids(sequence[pos:]))
  return np.concatenate(ids)


def tokenize(sequences: Sequence[str] | str, max_length: int | None = None,
             crop: bool = False) -> np.ndarray:
  """ESM-2 tokens `<cls> seq <eos> <pad>...` of a batch of sequences.

  Args:
    sequences: amino-acid strings (one string is a batch of one). Lowercase is accepted;
      letters outside the vocabulary map to <unk>; '<mask>' etc. may appear inline.
    max_length: token length L of the result, incl. <cls>/<eos>; None -> longest + 2.
    crop: over-long policy. A sequence needing more than L tokens (or more than
      ESM_MAX_TOKENS = 1024, the positions ESM-2 was trained on, when max_length is None)
      raises ValueError unless crop=True, which keeps its first L - 2 residues (the data
      pipeline chooses random windows itself, before tokenising).

  Returns:
    int32 [B, L] numpy array.
  """
  if isinstance(sequences, str):
    sequences = [sequences]
  rows = [_tokenize_one(s) for s in sequences]
  longest = max((len(r) for r in rows), default=0) + 2
  if max_length is None:
    max_length = longest if not crop else min(longest, rc.ESM_MAX_TOKENS)
    limit = rc.ESM_MAX_TOKENS
  else:
    limit = max_length
  if max_length < 2:
    raise ValueError(f"max_length {max_length} leaves no room for <cls> and <eos>")
  out = np.full((len(rows), max_length), rc.ESM_PAD, np.int32)
  for i, ids in enumerate(rows):
    if len(ids) + 2 > limit:
      if not crop:
        raise ValueError(
            f"sequence {i} has {len(ids)} residues: {len(ids) + 2} tokens exceed the limit "
            f"of {limit}; crop it first or pass crop=True (keeps the first {limit - 2})")
      ids = ids[:limit - 2]
    out[i, 0] = rc.ESM_CLS
    out[i, 1:len(ids) + 1] = ids
    out[i, len(ids) + 1] = rc.ESM_EOS
  return out

