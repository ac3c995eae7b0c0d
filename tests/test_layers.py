"""Imports go one way: common <- data <- models <- training <- the entry points
(bihier_jax/*.py) <- configs, data_pipelines <- launch <- bench. The layer table and the
import parser (every import, function-local ones included) are bench/code_shape.py's."""

import sys

from tests import paths

sys.path.insert(0, paths.BENCH)
import code_shape  # noqa: E402  # pylint: disable=wrong-import-position


def test_no_module_imports_a_higher_layer():
  upward = code_shape.upward_imports()
  assert not upward, "imports of a higher layer:\n" + "\n".join(
      f"  {u.path}:{u.line} imports {u.imported}" for u in upward)


def test_the_parser_sees_a_function_local_upward_import(tmp_path):
  """The check can fail: a data module importing models inside a function is caught."""
  package = tmp_path / "bihier_jax" / "data"
  package.mkdir(parents=True)
  (package / "leak.py").write_text(
      "def f():\n  from bihier_jax.models import esm2\n  return esm2\n")
  found = code_shape.upward_imports(str(tmp_path))
  assert [(u.path, u.imported) for u in found] == [
      ("bihier_jax/data/leak.py", "bihier_jax.models.esm2")]
