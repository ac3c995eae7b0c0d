"""Test-wide settings: CPU only, quiet TensorFlow, transformers without TensorFlow."""

import os

os.environ.setdefault("USE_TF", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

# XLA CPU steps stop page-faulting their buffers in on every call: bihier_jax.common.host.
from bihier_jax.common import host  # pylint: disable=wrong-import-position

host.tune_malloc()
