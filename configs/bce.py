"""B-cell epitopes (ScanNet BCE): per-residue binary classification, 5-fold CV.

  python -m data_pipelines.download bce --out RAW
  for k in 1 2 3 4 5; do
    python -m data_pipelines.preprocess bce --raw RAW --out PREPARED_k --holdout-fold $k
    python -m bihier_jax.train --config configs/bce.py --workdir W_k --config.data.dir=PREPARED_k
  done

`test` = fold k; a deterministic 10% `val` of the other folds selects the model (ScanNet
selected on fold k itself). Metric: ScanNet's weighted AUPRC; `python -m
bihier_jax.pool_cv` pools the five folds' test predictions into the published
protocol's one number (docs/tasks.md, with the differences: no transfer from PPBS, the
1022-residue crop).
"""

from configs import variants, default


def get_config(arg: str | None = None):
  variants.check_variant("bce", arg)
  c = default.get_config()
  c.task.name = "bce"
  c.task.level = "node"
  c.task.loss = "sigmoid_bce"
  c.task.num_classes = 1
  c.task.class_names = ("epitope",)
  c.task.metrics = ("auprc", "auroc")
  c.task.select_metric = "auprc"
  c.task.select_mode = "max"

  c.data.eval_splits = ("val", "test")
  c.data.select_split = "val"
  c.train.batch_size = 8
  c.train.num_steps = 20_000  # ≈ 55 epochs of ~2,900 training examples at batch 8
  c.train.eval_every = 1_000
  c.train.checkpoint_every = 1_000
  if arg == "tiny":
    variants.fixture_tiny(c)
  return c
