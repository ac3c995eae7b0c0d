"""Model quality assessment on ATOM3D PSR (split by year): regress GDT_TS per decoy.

  python -m data_pipelines.download mqa --out RAW
  python -m data_pipelines.preprocess mqa --raw RAW --out PREPARED
  python -m bihier_jax.train --config configs/mqa.py --workdir W --config.data.dir=PREPARED

Metrics (docs/tasks.md): global and per-target (mean over CASP targets) Pearson,
Spearman and Kendall τ-b between predicted and true GDT_TS; per-target means skip
targets with fewer than 3 decoys, as ATOM3D's evaluator does. Models are selected by
global Spearman (ESM-GearNet's choice). GDT_TS is on a 0–1 scale, trained with MSE.
"""

from configs import variants, default


def get_config(arg: str | None = None):
  variants.check_variant("mqa", arg)
  c = default.get_config()
  c.task.name = "mqa"
  c.task.level = "graph"
  c.task.loss = "mse"
  c.task.num_classes = 1
  c.task.class_names = ("gdt_ts",)
  c.task.metrics = ("spearman_global", "pearson_global", "kendall_global",
                    "spearman_per_target", "pearson_per_target", "kendall_per_target",
                    "rmse")
  c.task.select_metric = "spearman_global"
  c.task.select_mode = "max"
  c.task.min_group_size = 3  # ATOM3D skips targets with < 3 decoys
  c.task.label_mean = 0.5  # GDT_TS lies in [0, 1]: centre the head's output
  c.task.label_std = 0.25

  c.data.eval_splits = ("val", "test")
  c.data.select_split = "val"
  c.model.head.pooling = "mean"
  c.train.batch_size = 8
  c.train.num_steps = 50_000  # ≈ 16 epochs of 25,400 decoys at batch 8
  c.train.eval_every = 2_000
  c.train.checkpoint_every = 2_000
  if arg == "tiny":
    variants.fixture_tiny(c)
    c.task.min_group_size = 1
  return c
