"""Converts ESM-2 weights to our format: an Orbax checkpoint plus config.json.

  python -m bihier_jax.convert_esm --src PATH --out DIR [--no-mlm-head] [--overwrite]

PATH: a Hugging Face ESM directory (config.json + model.safetensors / pytorch_model.bin),
a fair-esm `.pt` file, or an already converted directory. Missing, unexpected or
mis-shaped tensors stop the conversion with a list of their names and shapes.
Load the result with `bihier_jax.models.esm2.from_pretrained(DIR)`.
"""

from __future__ import annotations

import argparse
import sys

import jax

from bihier_jax.models import esm2_checkpoint


def convert(src: str, out: str, mlm_head: bool = True, overwrite: bool = False) -> str:
  """Converts `src` into `out`; returns a one-line summary."""
  overrides = {} if mlm_head else {"mlm_head": False}
  cfg, params = esm2_checkpoint.load_pretrained(src, **overrides)
  esm2_checkpoint.save(out, cfg, params, source=src, overwrite=overwrite)
  n = sum(int(x.size) for x in jax.tree.leaves(params))
  return (f"{src} ({esm2_checkpoint.detect_format(src)}) -> {out}: {cfg.num_layers} layers, "
          f"width {cfg.embed_dim}, {cfg.num_heads} heads, mlm_head={cfg.mlm_head}, "
          f"{n:,} parameters")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--src", required=True, help="HF directory, fair-esm .pt, or converted dir")
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--no-mlm-head", action="store_true", help="drop the masked-LM head")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
  args = parser.parse_args(argv)
  try:
    print(convert(args.src, args.out, mlm_head=not args.no_mlm_head, overwrite=args.overwrite))
  except (esm2_checkpoint.CheckpointMismatchError, FileNotFoundError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
