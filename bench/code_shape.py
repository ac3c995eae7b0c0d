"""The shape of the code: largest modules, longest functions, imports against the layers.

  python bench/code_shape.py [--top N]

Layers, lowest first (a module may import its own layer and the ones below):
`bihier_jax.common` <- `bihier_jax.data` <- `bihier_jax.models` <- `bihier_jax.training`
<- the entry points (`bihier_jax/*.py`) <- `configs`, `data_pipelines` <- `launch` <-
`bench`. Every import counts, function-local ones included; tests/test_layers.py fails
on an upward one, with this table and parser. A function's length is its
lines without its docstring; configs are not counted (one `get_config` per file is the
config's form).
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
from typing import Iterator, NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = (("bihier_jax.common",), ("bihier_jax.data",), ("bihier_jax.models",),
          ("bihier_jax.training",), ("bihier_jax",), ("configs", "data_pipelines"),
          ("launch",), ("bench",))
LIBRARY = ("bihier_jax", "data_pipelines", "launch")


def layer_of(module: str) -> int | None:
  """Rank of a dotted module name in LAYERS (longest prefix wins), None if outside."""
  best, best_len = None, -1
  for rank, prefixes in enumerate(LAYERS):
    for prefix in prefixes:
      if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
        best, best_len = rank, len(prefix)
  return best


def python_files(top: str, root: str = ROOT) -> Iterator[str]:
  for folder, dirs, files in os.walk(os.path.join(root, top)):
    dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
    for name in sorted(files):
      if name.endswith(".py"):
        yield os.path.join(folder, name)


def module_name(path: str, root: str = ROOT) -> str:
  rel = os.path.relpath(path, root)[:-len(".py")].replace(os.sep, ".")
  return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def imported_modules(tree: ast.AST, module: str, is_package: bool) -> Iterator[tuple[int, str]]:
  """(line, dotted name) of every import in a module, relative ones resolved."""
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield node.lineno, alias.name
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = module.split(".")
        keep = len(parts) - node.level + (1 if is_package else 0)
        base = ".".join(parts[:keep] + ([base] if base else []))
      for alias in node.names:
        # `from pkg import module` names a module; `from module import name` a name in it.
        yield node.lineno, f"{base}.{alias.name}" if base else alias.name


class Upward(NamedTuple):
  path: str
  line: int
  imported: str


def upward_imports(root: str = ROOT) -> list[Upward]:
  """Imports of a higher layer than the importer's, over every layered package below
  `root` (the repository)."""
  found = []
  tops = sorted({prefix.split(".")[0] for prefixes in LAYERS for prefix in prefixes})
  for top in tops:
    for path in python_files(top, root):
      module = module_name(path, root)
      rank = layer_of(module)
      with open(path) as f:
        tree = ast.parse(f.read(), path)
      is_package = path.endswith("__init__.py")
      for line, name in imported_modules(tree, module, is_package):
        other = layer_of(name)
        if rank is not None and other is not None and other > rank:
          found.append(Upward(os.path.relpath(path, root), line, name))
  return found


def module_lengths() -> list[tuple[int, str]]:
  out = []
  for top in LIBRARY:
    for path in python_files(top):
      with open(path) as f:
        out.append((sum(1 for _ in f), os.path.relpath(path, ROOT)))
  return sorted(out, reverse=True)


def function_lengths() -> list[tuple[int, str]]:
  """(lines without the docstring, 'path:function') of every library function."""
  out = []
  for top in LIBRARY:
    for path in python_files(top):
      with open(path) as f:
        tree = ast.parse(f.read(), path)
      for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
          continue
        length = node.end_lineno - node.lineno + 1
        first = node.body[0]
        if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str)):
          length -= first.end_lineno - first.lineno + 1
        out.append((length, f"{os.path.relpath(path, ROOT)}:{node.name}"))
  return sorted(out, reverse=True)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--top", type=int, default=5)
  args = parser.parse_args(argv)
  modules, functions, upward = module_lengths(), function_lengths(), upward_imports()
  print(f"largest modules (of {len(modules)}):")
  for lines, path in modules[:args.top]:
    print(f"  {lines:5d}  {path}")
  print(f"longest functions (of {len(functions)}; lines without docstring):")
  for lines, where in functions[:args.top]:
    print(f"  {lines:5d}  {where}")
  print(f"upward imports: {len(upward)}")
  for u in upward:
    print(f"  {u.path}:{u.line} imports {u.imported}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
