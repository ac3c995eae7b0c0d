"""One storage layer for local paths and URLs (gs://, file://, ...).

Prepared records, ESM-2 checkpoints and config files may live in a bucket: on a TPU pod
every worker reads them from `gs://`, since workers share no disk. Local paths go
through `os` and `open` (no TensorFlow start-up); anything with a scheme
(`scheme://...`) goes through `tf.io.gfile`, which the input pipeline already uses
(TensorFlow is a dependency; it reads `gs://` natively and `file://` as a local path,
which is how the tests stand in for a bucket). Orbax reads and writes `gs://` through
`etils.epath` (TensorFlow's backend when TensorFlow is installed); `etils.epath` has no
`file://`, so `orbax_path` turns such URLs into plain paths.
"""

from __future__ import annotations

import builtins
import glob as glob_lib
import json
import os
import re
from typing import Any, IO

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(path: str | os.PathLike) -> bool:
  """Whether `path` names a scheme (gs://bucket/x, file:///x)."""
  return bool(_SCHEME.match(os.fspath(path)))


def _gfile():
  # TensorFlow's start-up lines (oneDNN, absl::InitializeLog) before a one-line error.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.io.gfile


def absolute(path: str | os.PathLike) -> str:
  """A local path made absolute (`~` expanded); a URL as it is."""
  path = os.fspath(path)
  return path if is_url(path) else os.path.abspath(os.path.expanduser(path))


def join(path: str, *parts: str) -> str:
  """os.path.join for local paths; '/'-joined for URLs."""
  if not is_url(path):
    return os.path.join(path, *parts)
  return "/".join([path.rstrip("/"), *(p.strip("/") for p in parts)])


def local_path(path: str) -> str | None:
  """The local path a `file://` URL or plain path names; None for other schemes."""
  path = os.fspath(path)
  if path.startswith("file://"):
    return path[len("file://"):]
  return None if is_url(path) else path


def orbax_path(path: str) -> str:
  """What Orbax (etils.epath) can open: gs:// as it is, file:// as a local path."""
  local = local_path(path)
  return path if local is None else os.path.abspath(os.path.expanduser(local))


def exists(path: str) -> bool:
  return _gfile().exists(path) if is_url(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  return _gfile().isdir(path) if is_url(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
  if is_url(path):
    return _gfile().exists(path) and not _gfile().isdir(path)
  return os.path.isfile(path)


def listdir(path: str) -> list[str]:
  """Names in a folder (no trailing '/', which gfile gives folders in buckets)."""
  if is_url(path):
    return [n.rstrip("/") for n in _gfile().listdir(path)]
  return os.listdir(path)


def glob(pattern: str) -> list[str]:
  return list(_gfile().glob(pattern)) if is_url(pattern) else glob_lib.glob(pattern)


def getsize(path: str) -> int:
  return int(_gfile().stat(path).length) if is_url(path) else os.path.getsize(path)


def signature(path: str) -> tuple[int, int]:
  """(size in bytes, modification time in ns): changes when the file is rewritten."""
  if is_url(path):
    stat = _gfile().stat(path)
    return int(stat.length), int(stat.mtime_nsec)
  stat = os.stat(path)
  return int(stat.st_size), int(stat.st_mtime_ns)


def open(path: str, mode: str = "r") -> IO[Any]:  # pylint: disable=redefined-builtin
  """A file object: builtins.open locally, tf.io.gfile.GFile for URLs."""
  return _gfile().GFile(path, mode) if is_url(path) else builtins.open(path, mode)


def read_bytes(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def read_json(path: str) -> Any:
  with open(path, "r") as f:
    return json.loads(f.read())
