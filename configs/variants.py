"""The `:tiny` variant shared by the benchmark configs: runs on the test fixtures in
seconds (random `tiny` ESM-2, 2-block 16-wide GNN, a few steps, small buckets)."""

import ml_collections


def apply_tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c.data.max_residues = 256  # longer fixture chains (3mht A: 327) are cropped
  c.data.length_buckets = (258,)  # one bucket: one compiled train and eval program
  # Fixture records are built with `--max-neighbors 8`: every protein node then has
  # exactly 8 in-edges, so eval examples fit the edge budgets derived from train.
  c.data.max_neighbors = 8
  c.data.shuffle_buffer = 8
  c.data.num_workers = 1
  c.model.esm.preset = "tiny"
  c.model.esm.checkpoint = ""
  c.model.gnn.hidden = 16
  c.model.gnn.num_blocks = 2
  c.model.fusion.levels = (1, 2)
  c.model.fusion.dim = 16
  c.model.fusion.num_heads = 2
  c.model.head.hidden = 16
  c.optim.warmup_steps = 1
  c.optim.step_every = 2
  c.train.num_steps = 3
  c.train.batch_size = 2
  c.train.eval_every = 3
  c.train.checkpoint_every = 3
  c.train.log_every = 1
  c.train.keep_checkpoints = 1
  return c


def check_variant(name: str, arg: str | None, known=("tiny",)) -> None:
  if arg and arg not in known:
    raise ValueError(f"configs/{name}.py: unknown variant {arg!r} (known: {', '.join(known)})")
