"""bihier_jax.testing, the fixture source: lengths, the tiny config, batches."""

import numpy as np
import pytest

from bihier_jax import testing
from configs import default


def test_pdb_like_lengths_median_and_clip():
  lengths = testing.pdb_like_lengths(4000, seed=1)
  assert lengths.dtype == np.int64 and 180 <= np.median(lengths) <= 220
  assert lengths.min() >= 30 and lengths.max() <= 1500
  np.testing.assert_array_equal(lengths, testing.pdb_like_lengths(4000, seed=1))
  assert testing.pdb_like_lengths(4000, seed=1, clip=(30, 1022)).max() == 1022


def test_tiny_config_sets_the_test_model_then_dotted_overrides():
  c = testing.tiny_config(default.get_config(), {"model.kind": "serial",
                                                 "model.gnn.hidden": 32})
  assert (c.model.esm.preset, c.model.fusion.dim, c.model.head.hidden) == ("tiny", 16, 16)
  assert (c.model.kind, c.model.gnn.hidden, c.model.gnn.num_blocks) == ("serial", 32, 2)
  with pytest.raises((KeyError, AttributeError)):
    testing.tiny_config(default.get_config(), {"model.no_such_field.x": 1})


def test_small_batch_holds_the_small_examples(small_batch):
  examples = testing.small_examples()
  assert int(small_batch.node_mask.sum()) == sum(
      len(ex.aatype) + len(ex.ligand_positions) for ex in examples)
  assert int(small_batch.graph_mask.sum()) == len(examples)
