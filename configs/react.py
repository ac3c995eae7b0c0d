"""EC reaction classification (IEConv ProtFunct, 384 classes), as ProNet trains it.

  python -m data_pipelines.download react --out RAW
  python -m data_pipelines.preprocess react --raw RAW --out PREPARED
  python -m bihier_jax.train --config configs/react.py --workdir W --config.data.dir=PREPARED

Recipe of the ProNet reference: batch 32, Adam 5e-4, step decay ×0.5 every 60 epochs,
dropout 0.3, residue-type masking 0.2, Cα noise std 0.1 Å clipped to ±0.3 Å, sum
readout; 200 epochs and evaluation every 5 are ours. Metric: top-1 accuracy (best val
checkpoint on test). The recipe is in epochs (`EPOCHS`), turned into steps by
`data.epochs.resolve_epochs`; the step fields below assume 1,038 packed steps per epoch
(docs/data.md: an epoch is not ceil(29,215 / 32) = 913 steps).
"""

from configs import variants, default

# The ProNet recipe in epochs: field -> epochs (resolve_epochs sets the step field).
EPOCHS = {
    "train.num_epochs": 200,
    "train.eval_every_epochs": 5,
    "train.checkpoint_every_epochs": 5,
    "optim.step_every_epochs": 60,
}
# Fallback epoch length for the step fields: 29,215 chains / 28.1 per batch (see above).
FALLBACK_STEPS_PER_EPOCH = 1038


def get_config(arg: str | None = None):
  variants.check_variant("react", arg)
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
  c.optim.step_factor = 0.5
  c.train.batch_size = 32
  for name, epochs in EPOCHS.items():
    group, field = name.split(".")
    c[group][field] = epochs
    step_field = field.replace("num_epochs", "num_steps").replace("_epochs", "")
    c[group][step_field] = epochs * FALLBACK_STEPS_PER_EPOCH
  if arg == "tiny":
    variants.fixture_tiny(c)
    for name in EPOCHS:  # the tiny run counts in steps
      group, field = name.split(".")
      c[group][field] = 0
  return c
