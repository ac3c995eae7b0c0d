"""Your own labelled structures (task `custom`): the config is read from the prepared folder.

  python -m data_pipelines.preprocess custom --raw STRUCTURES --labels LABELS.csv --out DIR
  python -m bihier_jax.train   --config configs/custom.py:DIR --workdir W
  python -m bihier_jax.eval    --config configs/custom.py:DIR --workdir W
  python -m bihier_jax.predict --config configs/custom.py:DIR --workdir W --structure F.pdb
  python -m launch.ablate --config configs/custom.py --config-arg DIR --sweep baselines ...

The folder goes after the colon (the task block comes from DIR/custom.json when the
config is built, before --config.* overrides); `DIR,small` and `DIR,tiny` select the
variants of configs/variants.py. What custom.json sets, and why: docs/custom_data.md,
"The config".
"""

import os
import sys

import ml_collections

from bihier_jax import config_check
from bihier_jax.training import metrics
from configs import default, variants
from data_pipelines import custom

VARIANTS = ("small", "tiny")
METRICS = {
    "class": ("accuracy", "majority_accuracy", "macro_f1"),
    "binary": ("auroc", "auprc"),
    "regression": ("rmse", "pearson", "spearman"),
}
SELECT = {"class": ("accuracy", "max"), "binary": ("auprc", "max"),
          "regression": ("rmse", "min")}


def parse_arg(arg: str | None) -> tuple[str, str]:
  """'DIR' -> (DIR, ''); 'DIR,tiny' -> (DIR, 'tiny') (a last ',<variant>' is a variant).

  A last ',<word>' that names no variant, after a folder that exists, is a misspelt
  variant (unless the whole argument is a folder)."""
  if not arg:
    return "", ""
  head, _, tail = arg.rpartition(",")
  if head and tail in VARIANTS:
    return head, tail
  if head and os.path.isdir(os.path.expanduser(head)) and not os.path.isdir(
      os.path.expanduser(arg)):
    guess = config_check.closest(tail, VARIANTS)
    hint = f"did you mean {guess!r}? " if guess else ""
    _fail(f"unknown variant {tail!r} after {head} ({hint}variants: "
          f"{', '.join(VARIANTS)})")
  return arg, ""


def _fail(message: str):
  """One line and exit status 2: get_config runs while the command line is parsed."""
  print(f"error: configs/custom.py: {message}", file=sys.stderr)
  raise SystemExit(2)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  directory, variant = parse_arg(arg)
  if not directory:
    _fail("name the prepared folder after a colon: --config configs/custom.py:DIR "
          "(--config.data.dir is applied too late to choose the task)")
  try:
    meta = custom.load_task_metadata(directory)
  except custom.LabelFileError as e:
    _fail(str(e))
  kind = meta["kind"]
  c = default.get_config()
  c.task.name = "custom"
  c.task.level = meta["level"]
  c.task.loss = meta["loss"]
  c.task.num_classes = int(meta["num_classes"])
  c.task.class_names = tuple(meta["classes"] or ())
  c.task.label_kind = kind
  # macro_f1 only where the metrics module defines it (one place per metric).
  c.task.metrics = tuple(m for m in METRICS[kind] if m in metrics.ALL)
  c.task.select_metric, c.task.select_mode = SELECT[kind]
  c.task.label_mean = float(meta["label_mean"])
  c.task.label_std = float(meta["label_std"])

  c.data.dir = os.path.abspath(os.path.expanduser(directory))
  c.data.train_split = "train"
  c.data.eval_splits = tuple(s for s in ("val", "test")
                             if meta["splits"].get(s, {}).get("examples"))
  c.data.select_split = "val"
  c.data.cutoff = float(meta["graph"]["cutoff"])
  c.data.max_neighbors = int(meta["graph"]["max_neighbors"])
  c.data.num_workers = 1

  c.model.head.pooling = "mean"
  c.train.batch_size = 8
  c.train.num_epochs = 30
  c.train.eval_every_epochs = 2
  c.train.checkpoint_every_epochs = 2
  c.train.log_every = 10
  c.train.keep_checkpoints = 2
  c.optim.warmup_steps = 50

  if variant == "small":
    variants.small(c)
  elif variant == "tiny":
    variants.tiny(c, max_residues=64, blocks=1)
    c.train.num_epochs = c.train.eval_every_epochs = c.train.checkpoint_every_epochs = 0
    c.train.num_steps = 4
    c.train.eval_every = 2
    c.train.checkpoint_every = 2
  return c
