"""Default configuration: every field, documented. Task configs import and change it.

Use: `python -m bihier_jax.train --config configs/default.py --workdir DIR
--config.model.fusion.levels='(2,4)'`. Options after a colon select variants in configs
that define them (`configs/lba30.py:tiny`).
"""

import ml_collections

from bihier_jax.common import residue_constants as rc
from bihier_jax.data.graph import DEFAULT_GRAPH


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0

  # --- task: what is predicted and how it is scored -------------------------------------
  c.task = ml_collections.ConfigDict()
  c.task.name = "demo"  # demo | react | mqa | lba30 | lba60 | ppbs | bce
  c.task.level = "node"  # node (per residue) | graph (per protein)
  c.task.loss = "softmax_ce"  # softmax_ce | sigmoid_bce | mse
  c.task.num_classes = 3  # classes for softmax_ce; 1 for sigmoid_bce / mse
  # Names of the prediction columns in predict's output (() = class_0.., or the task's
  # name for the one column of sigmoid_bce / mse).
  c.task.class_names = ()
  c.task.metrics = ("accuracy",)  # names from bihier_jax.training.metrics
  c.task.select_metric = "accuracy"  # validation metric that picks the best checkpoint
  c.task.select_mode = "max"  # max | min
  c.task.label_mean = 0.0  # regression targets are standardised with these
  c.task.label_std = 1.0

  # --- data: where records are and how they are batched ---------------------------------
  c.data = ml_collections.ConfigDict()
  c.data.dir = ""  # records directory written by data_pipelines.preprocess
  # 'module:function' that writes data.dir's records when it has none (configs/demo.py).
  c.data.builder = ""
  c.data.train_split = "train"
  c.data.eval_splits = ("val", "test")
  c.data.select_split = "val"
  c.data.max_residues = rc.ESM_MAX_RESIDUES  # chains are cropped to this many residues
  c.data.crop = "random"  # training: random / first window when a chain is longer
  # Evaluation of a protein with a longer chain: "whole" scores every residue (the chain
  # in overlapping ESM windows, docs/data.md "Long chains"); "first_window" crops it to
  # the first data.max_residues residues (ScanNet's protocol).
  c.data.eval_long_chains = "whole"
  # Training shuffle buffer, records; 0 = a permutation of the whole split (records are
  # read by offset: no memory either way; docs/data.md: shuffling).
  c.data.shuffle_buffer = 0
  # Padding budgets: lengths of ESM rows are bucketed; each bucket is one program.
  c.data.length_buckets = (128, 256, 512, 1024)
  # Packed ESM rows: several chains per row, back to back, each <cls> seq <eos>
  # (docs/data.md: packed rows). False = one chain per row, rows bucketed by length.
  c.data.pack_rows = True
  # Packing row length; 0 = chosen from the data's sizes for model.esm.preset (fewest
  # ESM matmul FLOPs per real token); longer chains use the length buckets above it.
  c.data.row_length = 0
  c.data.max_neighbors = DEFAULT_GRAPH.max_neighbors
  c.data.cutoff = DEFAULT_GRAPH.cutoff  # Å
  # Residues lacking N, C or O (CA-only models, truncated residues) in predict's inputs:
  # warn = kept, counted and reported | skip = their protein left out | allow = kept
  # quietly. The model sees them with degenerate frames (docs/data.md). Preprocessing
  # takes the same choice as --incomplete-backbone.
  c.data.incomplete_backbone = "warn"
  c.data.num_workers = 4  # preprocessing processes

  # --- model ----------------------------------------------------------------------------
  c.model = ml_collections.ConfigDict()
  c.model.kind = "bihier"  # bihier | esm_only | gnn_only | serial | parallel | cross
  c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (params stay float32)
  # Precision of float32 matmuls: default | high | highest. 'default' is the backend's:
  # exact on CPU, TF32 on GPU, one bfloat16 pass on TPU; 'highest' is float32 everywhere
  # (slower on GPU/TPU). docs/model.md, "Matmul precision".
  c.model.matmul_precision = "default"

  c.model.esm = ml_collections.ConfigDict()
  # t6_8M | t12_35M | t30_150M | t33_650M | t36_3B | t48_15B | tiny | L<n>_D<d>_H<h>_F<f>;
  # with model.esm.checkpoint, `train` reads it from the checkpoint (docs/pretrained.md).
  c.model.esm.preset = "t6_8M"
  # HF dir / fair-esm .pt / converted dir, local or gs://; "" = random init (loud)
  c.model.esm.checkpoint = ""
  # finetune | frozen | last_n (last_n layers + final LayerNorm) | lora. Frozen parameters are
  # constants of the step: zero gradient, no weight-gradient matmuls, no optimizer state.
  c.model.esm.trainable = "finetune"
  c.model.esm.last_n = 2  # layers trained when trainable == last_n
  # trainable == lora: low-rank adapters W + (alpha / rank) B A on these projections of
  # every layer (q | k | v | out | fc1 | fc2); the base weights are constants.
  c.model.esm.lora_rank = 8
  c.model.esm.lora_alpha = 16.0
  c.model.esm.lora_targets = ("q", "v")
  # Rematerialise each layer in the backward pass (memory for compute); required with
  # train.fsdp > 1 (the launchers' --fsdp sets it). Off, activations are kept, weights not.
  c.model.esm.remat = False
  # Keep the ESM-2 residual stream (every layer's h + branch sum) in float32 when
  # model.dtype is bfloat16, as torch autocast does; matmul inputs stay bf16. False =
  # the stream in model.dtype (docs/model.md, Numerics).
  c.model.esm.f32_residual = True
  c.model.esm.scan_layers = True  # stacked + scanned layers: compile time flat in depth
  c.model.esm.attention = "auto"  # auto (per backend, docs/model.md) | exact | splash | flash_gpu
  c.model.esm.token_dropout = True
  # Residues hidden by the residue-type augmentation (gnn.mask_aatype_prob) also get
  # <mask> as their ESM token, so fusion cannot pass the hidden type to the GNN.
  c.model.esm.mask_augmented = True

  c.model.gnn = ml_collections.ConfigDict()
  c.model.gnn.level = "backbone"  # amino_acid | backbone | all_atom
  c.model.gnn.hidden = 128
  c.model.gnn.num_blocks = 4
  c.model.gnn.num_radial = 6
  c.model.gnn.num_spherical = 2
  c.model.gnn.cutoff = DEFAULT_GRAPH.cutoff  # Å
  c.model.gnn.dropout = 0.3
  c.model.gnn.mask_aatype_prob = 0.0  # training augmentation: residue-type masking
  c.model.gnn.coord_noise_std = 0.0  # training augmentation: Å, clipped at 3 std
  c.model.gnn.coord_noise_clip = 0.3  # Å

  c.model.fusion = ml_collections.ConfigDict()
  c.model.fusion.mode = "global"  # local (gated) | global (multi-head self-attention)
  c.model.fusion.levels = (2, 4)  # GNN blocks (1-based) after which fusion happens
  c.model.fusion.direction = "bi"  # bi | seq2struct | struct2seq
  c.model.fusion.layer_pairing = "even"  # even | last | explicit tuple of ESM layers
  c.model.fusion.dim = 128  # width of the fused residue tokens
  c.model.fusion.num_heads = 4
  c.model.fusion.ffn_mult = 4  # global fusion FFN width = ffn_mult x fusion.dim
  c.model.fusion.dropout = 0.1
  # LayerNorm wherever the two streams meet: both fusion inputs (the GNN stream goes on
  # from LN(X)), the serial kind's input sum, both readout halves. False = the model
  # before this normalisation (ProNet states shrink ~8x per block, so fusion and the
  # readout then see the sequence stream only), kept for reproduction.
  c.model.fusion.norm = True
  c.model.fusion.write_back = "add"  # add (residual; pLM update zero at init) | replace

  # Per-residue features the head reads: streams (final ESM + GNN states), fused (the
  # last fusion level's tokens), auto (fused for kind=cross as ESM-GearNet, else streams)
  c.model.readout = "auto"

  c.model.head = ml_collections.ConfigDict()
  c.model.head.pooling = "mean"  # sum | mean (graph tasks)
  c.model.head.hidden = 128
  c.model.head.dropout = 0.1

  # --- optimisation ---------------------------------------------------------------------
  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 5e-4
  c.optim.esm_lr_ratio = 0.1  # ESM learning rate = ratio x learning_rate
  # LoRA adapters (model.esm.trainable=lora) have their own group: learning rate =
  # ratio x learning_rate (they are new weights; esm_lr_ratio does not apply to them).
  c.optim.lora_lr_ratio = 1.0
  c.optim.weight_decay = 0.01
  c.optim.schedule = "cosine"  # cosine | step | constant
  c.optim.warmup_steps = 100
  c.optim.step_every = 1000  # step schedule: decay every this many steps
  c.optim.step_every_epochs = 0.0  # > 0: decay every this many epochs (replaces step_every)
  c.optim.step_factor = 0.5
  c.optim.grad_clip = 1.0  # global norm

  # --- training loop --------------------------------------------------------------------
  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 10_000
  # Epoch counts (0 = unused) set the step field named beside them at the start of
  # training, from the real number of packed batches per pass over the training split.
  c.train.num_epochs = 0.0  # -> train.num_steps
  c.train.eval_every_epochs = 0.0  # -> train.eval_every
  c.train.checkpoint_every_epochs = 0.0  # -> train.checkpoint_every
  c.train.batch_size = 8  # proteins per global batch (per update)
  # Micro-batches per update and device: gradients are summed over them (activation
  # memory of one micro-batch of batch_size / (devices x grad_accum_steps) proteins).
  c.train.grad_accum_steps = 1
  # Parameter sharding (ZeRO-3 style): devices per 'fsdp' group. The large ESM-2 layer
  # matrices and their Adam moments are split over a group and gathered one layer at a
  # time; the batch is still split over every device. 1 = plain data parallelism; must
  # divide the devices of each host; > 1 needs model.esm.remat=True. See
  # docs/parallelism.md.
  c.train.fsdp = 1
  c.train.eval_every = 1000  # periodic evaluation (and saved checkpoint) every N steps
  # Periodic evaluations score only data.select_split (the test splits stay unseen until
  # the selected checkpoint is reported at the end); True also scores and logs them.
  c.train.eval_test_during_training = False
  c.train.checkpoint_every = 1000
  c.train.log_every = 50
  c.train.keep_checkpoints = 3
  # An unreadable newest (or best) checkpoint: fallback = resume from / evaluate the
  # newest (next best) readable one, with a warning; fail = stop with an error.
  c.train.on_corrupt_checkpoint = "fallback"
  c.train.max_consecutive_nonfinite = 10  # stop with an error after this many bad steps
  c.train.multi_host = False  # call jax.distributed.initialize() first

  # --- added by the training issue (append-only) -----------------------------------------
  # Per-target metrics (MQA) skip groups smaller than this (ATOM3D's evaluator: 3,
  # gvp-pytorch: 1); used groups and NaN groups are reported beside the mean.
  c.task.min_group_size = 1
  return c
