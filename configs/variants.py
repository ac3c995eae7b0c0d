"""The shrunken variants of the task configs, in one place.

Public: small(c) (CPU-sized: minutes on 2 cores), tiny(c, max_residues, blocks) (tests:
seconds), fixture_tiny(c) (the benchmark configs' `:tiny`, on the test fixtures) and
check_variant(name, arg, known). Each takes and returns a ConfigDict.
"""

import ml_collections


def small(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Random `tiny` ESM-2, a 2-block 64-wide GNN fused after both blocks, batch 4."""
  c.data.max_residues = 512
  c.data.length_buckets = (256, 512)
  c.model.esm.preset = "tiny"
  c.model.esm.checkpoint = ""
  c.model.gnn.hidden = 64
  c.model.gnn.num_blocks = 2
  c.model.gnn.dropout = 0.1
  c.model.fusion.levels = (1, 2)
  c.model.fusion.dim = 64
  c.model.fusion.num_heads = 4
  c.model.head.hidden = 64
  c.optim.learning_rate = 2e-3
  c.optim.esm_lr_ratio = 1.0  # the tiny ESM-2 branch is random: train it at full rate
  c.optim.warmup_steps = 20
  c.train.batch_size = 4
  return c


def tiny(c: ml_collections.ConfigDict, *, max_residues: int = 256,
         blocks: int = 2) -> ml_collections.ConfigDict:
  """Random `tiny` ESM-2, a `blocks`-block 16-wide GNN fused after each, 3 steps."""
  c.data.max_residues = max_residues
  c.data.length_buckets = (max_residues + 2,)  # one bucket: one compiled train and eval program
  c.data.shuffle_buffer = 8
  c.model.esm.preset = "tiny"
  c.model.esm.checkpoint = ""
  c.model.gnn.hidden = 16
  c.model.gnn.num_blocks = blocks
  c.model.fusion.levels = tuple(range(1, blocks + 1))
  c.model.fusion.dim = 16
  c.model.fusion.num_heads = 2
  c.model.head.hidden = 16
  c.optim.warmup_steps = 1
  c.train.num_steps = 3
  c.train.batch_size = 2
  c.train.eval_every = 3
  c.train.checkpoint_every = 3
  c.train.log_every = 1
  c.train.keep_checkpoints = 1
  return c


def fixture_tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`tiny` on the benchmark fixtures (tests/fixtures), in seconds."""
  tiny(c)  # 256 residues: longer fixture chains (3mht A: 327) are cropped
  # Fixture records are built with `--max-neighbors 8`: every protein node then has
  # exactly 8 in-edges, so eval examples fit the edge budgets derived from train.
  c.data.max_neighbors = 8
  c.data.num_workers = 1
  c.optim.step_every = 2
  return c


def check_variant(name: str, arg: str | None, known=("tiny",)) -> None:
  if arg and arg not in known:
    raise ValueError(f"configs/{name}.py: unknown variant {arg!r} (known: {', '.join(known)})")
