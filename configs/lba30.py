"""Ligand binding affinity, ATOM3D LBA split at 30% sequence identity.

  python -m data_pipelines.download lba30 --out RAW
  python -m data_pipelines.preprocess lba30 --raw RAW --out PREPARED
  python -m bihier_jax.train --config configs/lba30.py --workdir W --config.data.dir=PREPARED

Nodes: pocket residues (ESM on the full chains) + ligand heavy atoms typed by element.
Label: pK = −log10(Kd/Ki), regression with MSE. Metrics on the whole test set: RMSE,
Pearson, Spearman (docs/tasks.md); the checkpoint with the lowest validation RMSE is
reported, usually as mean ± std over 3 seeds (`--config.seed`).
"""

from configs import variants, default


def get_config(arg: str | None = None, identity: int = 30):
  variants.check_variant(f"lba{identity}", arg)
  c = default.get_config()
  c.task.name = f"lba{identity}"
  c.task.level = "graph"
  c.task.loss = "mse"
  c.task.num_classes = 1
  c.task.class_names = ("neglog_aff",)  # pK = -log10(Kd or Ki in M)
  c.task.metrics = ("rmse", "pearson", "spearman")
  c.task.select_metric = "rmse"
  c.task.select_mode = "min"
  # Rough centre and spread of PDBbind pK values; only conditions the optimisation
  # (predictions are mapped back to pK units before metrics).
  c.task.label_mean = 6.5
  c.task.label_std = 2.0

  c.data.eval_splits = ("val", "test")
  c.data.select_split = "val"
  c.model.gnn.level = "all_atom"
  c.model.head.pooling = "mean"
  c.train.batch_size = 8
  c.train.num_steps = 20_000  # ≈ 45 epochs of 3,507 complexes at batch 8
  c.train.eval_every = 500
  c.train.checkpoint_every = 500
  if arg == "tiny":
    variants.fixture_tiny(c)
  return c
