"""The embedded demo: per-residue 3-state secondary structure on 50 shipped chains.

  python -m bihier_jax.train --config configs/demo.py --workdir /tmp/demo

Data: the DSSP-annotated chains of MDAnalysisTests (data_pipelines/demo.py), built into
`data.dir` (~/.cache/bihier_jax/demo) on first use. Model: `small` of configs/variants.py
(random tiny ESM-2, no pretrained checkpoint ships; a 2-block 64-wide GNN, global fusion
after both), about 5 minutes on 2 CPU cores. `configs/demo.py:tiny`: a few steps, for
tests. docs/training.md has the demo's numbers.
"""

from configs import default, variants


def get_config(arg: str | None = None):
  c = default.get_config()
  c.task.name = "demo"
  c.task.level = "node"
  c.task.loss = "softmax_ce"
  c.task.num_classes = 3
  c.task.class_names = ("helix", "strand", "other")  # data_pipelines.demo's classes
  c.task.metrics = ("accuracy", "majority_accuracy")
  c.task.select_metric = "accuracy"
  c.task.select_mode = "max"

  c.data.dir = "~/.cache/bihier_jax/demo"
  c.data.builder = "data_pipelines.demo:build_records"  # run when data.dir has none
  c.data.eval_splits = ("val", "test")
  c.data.select_split = "val"
  c.data.crop = "random"
  c.data.shuffle_buffer = 64

  c.model.kind = "bihier"
  c.model.esm.trainable = "finetune"
  c.model.gnn.level = "backbone"
  c.model.fusion.mode = "global"
  variants.small(c)  # random tiny ESM-2, 2 GNN blocks of 64, fusion after both

  c.optim.weight_decay = 0.01
  c.optim.schedule = "cosine"

  # Held-out accuracy plateaus near step 100 (then the small train set is memorised).
  c.train.num_steps = 150
  c.train.eval_every = 50
  c.train.checkpoint_every = 50
  c.train.log_every = 10
  c.train.keep_checkpoints = 2

  variants.check_variant("demo", arg)
  if arg == "tiny":
    variants.tiny(c, max_residues=64, blocks=1)
    c.optim.warmup_steps = 2
    c.train.num_steps = 6
    c.train.checkpoint_every = 2
    c.train.keep_checkpoints = 2
  return c
