"""ESM-2 (Lin et al., Science 2023) in Flax: the sequence branch of the fusion model.

Re-exports the public names of the package, so `from bihier_jax.models import esm2;
esm2.ESM2(...)` works: `config` (ESM2Config, presets, parameter names), `tokenizer`,
`layers` (one layer's maths), `model` (ESM2, LoRA merge, init, from_pretrained); the
attention kinds are `models.attention_backends`. Checkpoint I/O is
`esm2.checkpoint`. The model, its numerics and parameter tree: docs/model.md "ESM-2".
"""

from bihier_jax.models.esm2.config import (
    EMBEDDING_PARAM, FINAL_NORM_PARAM, LAYERS_PARAM, LORA_PARAM, LORA_TARGETS, PRESETS,
    ESM2Config, config_from_preset, preset_architecture, preset_name)
from bihier_jax.models.esm2.layers import ROTARY_BASE, rotary_tables
from bihier_jax.models.esm2.model import (
    LAYER_WEIGHTS, MASK_RATIO_TRAIN, ESM2, ESM2Output, from_pretrained, init_params,
    merge_lora, num_params, param_shapes)
from bihier_jax.models.esm2.tokenizer import tokenize
