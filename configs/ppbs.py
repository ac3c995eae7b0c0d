"""Protein–protein binding sites (ScanNet PPBS): per-residue binary classification.

  python -m data_pipelines.download ppbs --out RAW        # label files + ~20K assemblies
  python -m data_pipelines.preprocess ppbs --raw RAW --out PREPARED
  python -m bihier_jax.train --config configs/ppbs.py --workdir W --config.data.dir=PREPARED

Loss: sigmoid cross-entropy weighted per residue by its chain's ScanNet sample weight.
Metric: weighted AUPRC as ScanNet computes it, over all residues of a split and per test
subset (`auprc/70`, `auprc/homology`, `auprc/topology`, `auprc/none`); AUROC as an
extra. Selection: validation AUPRC. Chains are cropped to ESM-2's 1022 residues, where
ScanNet scores 1024 (docs/tasks.md, "Known differences").
"""

from configs import variants, default


def get_config(arg: str | None = None):
  variants.check_variant("ppbs", arg)
  c = default.get_config()
  c.task.name = "ppbs"
  c.task.level = "node"
  c.task.loss = "sigmoid_bce"
  c.task.num_classes = 1
  c.task.class_names = ("binding_site",)
  c.task.metrics = ("auprc", "auroc", "auprc_per_group")
  c.task.select_metric = "auprc"
  c.task.select_mode = "max"

  c.data.eval_splits = ("val", "test")
  c.data.select_split = "val"
  c.data.crop = "random"
  c.train.batch_size = 8
  c.train.num_steps = 40_000  # ≈ 25 epochs of ~12.7K training chains at batch 8
  c.train.eval_every = 2_000
  c.train.checkpoint_every = 2_000
  if arg == "tiny":
    variants.fixture_tiny(c)
  return c
