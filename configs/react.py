"""EC reaction classification (IEConv ProtFunct, 384 classes), as ProNet trains it.

  python -m data_pipelines.download react --out RAW
  python -m data_pipelines.preprocess react --raw RAW --out PREPARED
  python -m bihier_jax.train --config configs/react.py --workdir W --config.data.dir=PREPARED

Recipe of the ProNet reference for react (DATASETS.md §3, DESIGN.md): batch 32, Adam
5e-4, step decay ×0.5 every 60 epochs, dropout 0.3, residue-type masking 0.2, Cα noise
std 0.1 Å clipped to ±0.3 Å, sum readout. 29,215 training chains = 913 steps/epoch at
batch 32. The epoch count (200) is ours. Metric: top-1 accuracy; the checkpoint with
the best validation accuracy is reported on test.
"""

from configs import benchmark_tiny, default

STEPS_PER_EPOCH = 913  # ceil(29,215 / 32)


def get_config(arg: str | None = None):
  benchmark_tiny.check_variant("react", arg)
  c = default.get_config()
  c.task.name = "react"
  c.task.level = "graph"
  c.task.loss = "softmax_ce"
  c.task.num_classes = 384
  c.task.metrics = ("accuracy",)
  c.task.select_metric = "accuracy"
  c.task.select_mode = "max"

  c.data.eval_splits = ("val", "test")
  c.data.select_split = "val"

  c.model.gnn.level = "backbone"  # ProNet's best react level (86.4%)
  c.model.gnn.dropout = 0.3
  c.model.gnn.mask_aatype_prob = 0.2
  c.model.gnn.coord_noise_std = 0.1
  c.model.gnn.coord_noise_clip = 0.3
  c.model.head.pooling = "sum"

  c.optim.learning_rate = 5e-4
  c.optim.weight_decay = 0.0  # plain Adam in the reference
  c.optim.schedule = "step"
  c.optim.warmup_steps = 0
  c.optim.step_every = 60 * STEPS_PER_EPOCH
  c.optim.step_factor = 0.5

  c.train.batch_size = 32
  c.train.num_steps = 200 * STEPS_PER_EPOCH
  c.train.eval_every = 5 * STEPS_PER_EPOCH
  c.train.checkpoint_every = 5 * STEPS_PER_EPOCH
  if arg == "tiny":
    benchmark_tiny.apply_tiny(c)
  return c
