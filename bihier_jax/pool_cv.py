r"""Pool cross-validation folds: `python -m bihier_jax.pool_cv --predictions F1 ... --out J`.

ScanNet's BCE headline number: the out-of-fold predictions of 5 runs
(RUN_k/eval/test_predictions.npz, from `python -m bihier_jax.eval`) concatenated into one
weighted AUPRC and AUROC over all residues, plus each fold's value and their mean ± std.
An example present in two files is an error (folds must be disjoint).

  python -m bihier_jax.pool_cv \
      --predictions W_1/eval/test_predictions.npz,...,W_5/eval/test_predictions.npz \
      --out pooled.json [--metrics auprc,auroc]

Writes the JSON (`training.pooling.pool_folds`; NaN as null); docs/training.md.
"""

import json
import math
import os
import sys

from absl import app
from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_list("predictions", None, "The folds' predictions .npz files "
                  "(comma-separated, or the flag repeated).")
flags.DEFINE_string("out", None, "Output JSON path.")
flags.DEFINE_list("metrics", ["auprc", "auroc"], "Binary metrics to pool.")
flags.mark_flags_as_required(["predictions", "out"])


def _nan_to_none(value):
  if isinstance(value, dict):
    return {k: _nan_to_none(v) for k, v in value.items()}
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def main(argv):
  # Extra positional paths are accepted too: `--predictions a.npz b.npz` in a shell.
  from bihier_jax.training import pooling  # pylint: disable=g-import-not-at-top
  paths = list(FLAGS.predictions) + list(argv[1:])
  try:
    result = pooling.pool_folds(paths, FLAGS.metrics)
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
  with open(FLAGS.out, "w") as f:
    json.dump(_nan_to_none(result), f, indent=1, sort_keys=True)
  pooled = result["pooled"]
  print(f"{result['num_folds']} folds, {pooled['num_examples']:.0f} examples, "
        f"{pooled['num_items']:.0f} items -> {FLAGS.out}")
  for m in result["metrics"]:
    print(f"{m}: pooled {pooled[m]:.4f}; per fold {result['per_fold_mean'][m]:.4f} "
          f"± {result['per_fold_std'][m]:.4f} ({result['per_fold_count'][m]} folds defined)")


if __name__ == "__main__":
  app.run(main)
