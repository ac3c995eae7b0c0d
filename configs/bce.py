"""B-cell epitopes (ScanNet BCE): per-residue binary classification, 5-fold CV.

  python -m data_pipelines.download bce --out RAW
  for k in 1 2 3 4 5; do
    python -m data_pipelines.preprocess bce --raw RAW --out PREPARED_k --holdout-fold $k
    python -m bihier_jax.train --config configs/bce.py --workdir W_k --config.data.dir=PREPARED_k
  done

With `--holdout-fold k` the preprocessing writes `test` = fold k, and splits the other
four folds into `train` and a deterministic 10% `val` (by example id) used for model
selection. ScanNet instead selected on fold k itself (DATASETS.md §5); ours avoids
selecting on the test fold. Metric: weighted AUPRC (trapezoidal, ScanNet's) with each
residue weighted by its example's sample weight. `bihier_jax.eval` reports it per fold
and saves each run's per-residue test predictions (`eval/test_predictions.npz`);
`python -m bihier_jax.pool_cv` pools the five out-of-fold files into the one AUPRC of
the published protocol (plus per-fold mean ± std); see docs/tasks.md.
ScanNet started from its PPBS model (transfer learning) and did not crop (Lmax 2120);
we crop each chain to 1022 residues (ESM-2 limit; first window at evaluation).
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
