"""The embedded demo: per-residue 3-state secondary structure on 50 shipped chains.

  python -m bihier_jax.train --config configs/demo.py --workdir /tmp/demo

Data: the DSSP-annotated chains of MDAnalysisTests (data_pipelines/demo.py; 35 train /
8 val / 7 test chains). `data.dir` defaults to ~/.cache/bihier_jax/demo, shared by
every demo run; the training command builds the records there on first use (a few
seconds). Override with --config.data.dir=DIR.

Model: the bidirectional hierarchical model (global fusion after GNN blocks 1 and 2)
with the `tiny` ESM-2 preset from RANDOM weights (no pretrained checkpoint ships with
the package; the run says so loudly) and a 2-block, 64-wide GNN. Tuned to finish in
about 5 minutes on 2 CPU cores.

Variants: `configs/demo.py:tiny` shrinks everything for tests (a few steps).
"""

from configs import default


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
  c.data.max_residues = 512
  c.data.crop = "random"
  c.data.shuffle_buffer = 64
  c.data.length_buckets = (256, 512)

  c.model.kind = "bihier"
  c.model.esm.preset = "tiny"
  c.model.esm.checkpoint = ""
  c.model.esm.trainable = "finetune"
  c.model.gnn.level = "backbone"
  c.model.gnn.hidden = 64
  c.model.gnn.num_blocks = 2
  c.model.gnn.dropout = 0.1
  c.model.fusion.mode = "global"
  c.model.fusion.levels = (1, 2)
  c.model.fusion.dim = 64
  c.model.fusion.num_heads = 4
  c.model.head.hidden = 64

  c.optim.learning_rate = 2e-3
  c.optim.esm_lr_ratio = 1.0  # the ESM branch is random: train it at full rate
  c.optim.weight_decay = 0.01
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = 20

  # Held-out accuracy plateaus near step 100 (then the small train set is memorised).
  c.train.num_steps = 150
  c.train.batch_size = 4
  c.train.eval_every = 50
  c.train.checkpoint_every = 50
  c.train.log_every = 10
  c.train.keep_checkpoints = 2

  if arg == "tiny":
    c.data.max_residues = 64
    c.data.length_buckets = (66,)
    c.data.shuffle_buffer = 8
    c.model.gnn.hidden = 16
    c.model.gnn.num_blocks = 1
    c.model.fusion.levels = (1,)
    c.model.fusion.dim = 16
    c.model.fusion.num_heads = 2
    c.model.head.hidden = 16
    c.optim.warmup_steps = 2
    c.train.num_steps = 6
    c.train.batch_size = 2
    c.train.eval_every = 3
    c.train.checkpoint_every = 2
    c.train.log_every = 1
  elif arg:
    raise ValueError(f"configs/demo.py: unknown variant {arg!r} (known: tiny)")
  return c
