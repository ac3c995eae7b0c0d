"""Imports go one way: common <- data <- models <- training <- the entry points
(bihier_jax/*.py) <- configs, data_pipelines <- launch <- bench. The layer table and the
import parser (every import, function-local ones included) are bench/code_shape.py's."""

import ast
import collections
import sys

from tests import paths

sys.path.insert(0, paths.BENCH)
import code_shape  # noqa: E402  # pylint: disable=wrong-import-position

# Upward imports main still had when the redesign began; its other branches remove them.
# This list must be empty after the merge (an entry that is gone fails the second test).
KNOWN = collections.Counter([
    ("bihier_jax/data/input_pipeline.py", "bihier_jax.models.esm2"),  # twice
    ("bihier_jax/data/input_pipeline.py", "bihier_jax.models.esm2"),
    ("bihier_jax/training/checkpointing.py", "bihier_jax.config_check"),
    ("bihier_jax/training/parallel.py", "bihier_jax.config_check"),
    ("bihier_jax/training/train_lib.py", "data_pipelines.preprocess"),
])


def _upward():
  return collections.Counter((u.path, u.imported) for u in code_shape.upward_imports())


def test_no_module_imports_a_higher_layer():
  new = _upward() - KNOWN
  assert not new, "imports of a higher layer:\n" + "\n".join(
      f"  {u.path}:{u.line} imports {u.imported}" for u in code_shape.upward_imports()
      if (u.path, u.imported) in new)


def test_known_upward_imports_still_exist():
  gone = KNOWN - _upward()
  assert not gone, f"gone, drop them from KNOWN: {sorted(gone)}"


def test_parser_sees_function_local_and_relative_imports():
  tree = ast.parse("def f():\n  from bihier_jax.training import steps\n"
                   "from . import graph\n")
  found = list(code_shape.imported_modules(tree, "bihier_jax.data.packing", False))
  assert sorted(found) == [(2, "bihier_jax.training.steps"), (3, "bihier_jax.data.graph")]
  assert code_shape.layer_of("bihier_jax.testing") == code_shape.layer_of("bihier_jax.cli")
  assert code_shape.layer_of("bihier_jax.data.graph") < code_shape.layer_of(
      "bihier_jax.models.esm2") < code_shape.layer_of("configs.demo")
