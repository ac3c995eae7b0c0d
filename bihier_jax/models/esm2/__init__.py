"""ESM-2 (Lin et al., Science 2023) in Flax: the sequence branch of the fusion model.

The package's public names, re-exported so `esm2.ESM2(...)`, `esm2.tokenize(...)` work
on `from bihier_jax.models import esm2`; checkpoint I/O is `esm2.checkpoint`. The model
and its numerics: docs/model.md "ESM-2".
"""

from bihier_jax.models.esm2.model import (
    ATTENTION_KINDS, EMBEDDING_PARAM, FINAL_NORM_PARAM, LAYERS_PARAM, LAYER_WEIGHTS,
    LORA_PARAM, LORA_TARGETS, MASK_RATIO_TRAIN, PALLAS_BLOCK, PALLAS_KINDS, PRESETS,
    ROTARY_BASE, ESM2, AttentionLayout, ESM2Config, ESM2Output, attention_layout,
    config_from_preset, describe_attention, from_pretrained, init_params, merge_lora,
    num_params, pallas_row_multiple, param_shapes, preset_architecture, preset_name,
    rotary_tables, segment_positions, tokenize)
