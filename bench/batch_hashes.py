"""Digests of the batches the input pipeline delivers, to prove a refactor bit-identical.

  python bench/batch_hashes.py [--realistic-dir DIR] [--demo-dir DIR] [--batches N]

Hashes every array of every (Batch, meta) that `make_dataset` yields, in training order
(shuffle, random crops, several epochs) and in evaluation order, with packed and
unpacked ESM rows, on the demo records and on realistic records (lognormal lengths,
median 200 residues; the records of bench_input_pipeline.py). Prints one SHA-256 per
(dataset, layout, order) and one over all of them: run it before and after a change
on the same records, and the digests must match.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

from bihier_jax.data import budgets as budgets_lib  # noqa: E402
from bihier_jax.data import pipeline  # noqa: E402
from configs import default  # noqa: E402


def _update(digest, value) -> None:
  """Feed one batch field (array, dataclass of arrays, list, dict, scalar) in order."""
  if hasattr(value, "__dataclass_fields__"):
    for name in value.__dataclass_fields__:
      digest.update(name.encode())
      _update(digest, getattr(value, name))
  elif isinstance(value, dict):
    for key in sorted(value):
      digest.update(str(key).encode())
      _update(digest, value[key])
  elif isinstance(value, (list, tuple)):
    for item in value:
      _update(digest, item)
  elif value is None:
    digest.update(b"None")
  else:
    array = np.asarray(value)
    digest.update(f"{array.dtype}{array.shape}".encode())
    digest.update(np.ascontiguousarray(array).tobytes())


def stream_digest(data_dir: str, *, packed: bool, training: bool, batches: int
                  ) -> tuple[str, int]:
  """(SHA-256 of the first `batches` batches, or the whole epoch in evaluation, count)."""
  config = default.get_config()
  config.data.pack_rows = packed
  budgets = budgets_lib.bucket_budgets(config, budgets_lib.dataset_sizes(data_dir))
  digest = hashlib.sha256()
  count = 0
  for batch, meta in pipeline.make_dataset(
      data_dir, "train", config, training=training, seed=0, process_index=0,
      process_count=1, budgets=budgets):
    _update(digest, (batch, meta))
    count += 1
    if training and count >= batches:
      break
  return digest.hexdigest(), count


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--realistic-dir", default="",
                      help="realistic records: reused if there, else written there")
  parser.add_argument("--demo-dir", default="", help="demo records: reused if there, else built there")
  parser.add_argument("--batches", type=int, default=500,
                      help="training batches hashed per (dataset, layout)")
  args = parser.parse_args()
  tmp = tempfile.mkdtemp(prefix="batch_hashes_")
  demo_dir = args.demo_dir or os.path.join(tmp, "demo")
  if not os.path.exists(os.path.join(demo_dir, "metadata.json")):
    from data_pipelines import preprocess  # pylint: disable=g-import-not-at-top
    preprocess.main(["demo", "--out", demo_dir, "--workers", "2", "--no-progress"])
  real_dir = args.realistic_dir or os.path.join(tmp, "realistic")
  if not os.path.exists(os.path.join(real_dir, "metadata.json")):
    from bench import bench_input_pipeline  # pylint: disable=g-import-not-at-top
    bench_input_pipeline.realistic_dataset(real_dir, 4000)
  total = hashlib.sha256()
  hashed = 0
  for name, data_dir in (("demo", demo_dir), ("realistic", real_dir)):
    for packed in (True, False):
      for training in (True, False):
        digest, count = stream_digest(data_dir, packed=packed, training=training,
                                      batches=args.batches)
        hashed += count
        total.update(digest.encode())
        print(f"{name:9s} {'packed' if packed else 'unpacked':8s} "
              f"{'train' if training else 'eval':5s} {count:5d} batches  {digest}",
              flush=True)
  print(f"all {hashed} batches  {total.hexdigest()}")


if __name__ == "__main__":
  main()
