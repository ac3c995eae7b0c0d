"""ESM-2 fine-tuning memory: the compiled footprint of t33_650M with and without remat.

  python bench/bench_esm2_memory.py [--quick] [--json PATH]

`jit(loss+grad).lower().compile().memory_analysis()` of t33_650M fine-tuning (MLM loss,
L = 1024, batch 1) with and without per-layer remat (--quick: the tiny preset); params
come from jax.eval_shape, nothing is allocated.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import common  # noqa: E402  # pylint: disable=wrong-import-position

common.setup()

# pylint: disable=wrong-import-position
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bihier_jax.models import esm2  # noqa: E402
# pylint: enable=wrong-import-position


def finetune_memory(preset: str, length: int, batch: int, remat: bool) -> dict:
  cfg = esm2.config_from_preset(preset, remat=remat)
  model = esm2.ESM2(cfg)
  params = esm2.param_shapes(cfg)
  tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)

  def loss(p, t):
    logits = model.apply({"params": p}, t, return_mlm_logits=True,
                         output_hidden_states=False).logits
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), t[..., None], -1))

  start = time.perf_counter()
  compiled = jax.jit(jax.value_and_grad(loss)).lower(params, tokens).compile()
  compile_s = time.perf_counter() - start
  mem = compiled.memory_analysis()
  gib = 2.0 ** 30
  return {"preset": preset, "length": length, "batch": batch, "remat": remat,
          "compile_s": compile_s,
          "argument_gib": mem.argument_size_in_bytes / gib,
          "output_gib": mem.output_size_in_bytes / gib,
          "temp_gib": mem.temp_size_in_bytes / gib,
          "total_gib": (mem.argument_size_in_bytes + mem.output_size_in_bytes
                        + mem.temp_size_in_bytes - mem.alias_size_in_bytes) / gib}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="the tiny preset")
  parser.add_argument("--json", help="write the results dict here")
  args = parser.parse_args(argv)
  memory = [finetune_memory("tiny" if args.quick else "t33_650M", 1024, 1, remat)
            for remat in (False, True)]
  print("fine-tuning (MLM loss + grad) compiled memory, batch 1 x 1024")
  common.print_table(memory, ["preset", "remat", "argument_gib", "output_gib", "temp_gib",
                              "total_gib", "compile_s"])
  common.write_json(args.json, {**common.run_info(), "finetune_memory": memory}, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
