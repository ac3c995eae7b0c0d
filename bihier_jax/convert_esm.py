"""Converts ESM-2 weights to our format: an Orbax checkpoint plus config.json.

  python -m bihier_jax.convert_esm --src PATH --out DIR [--no-mlm-head] [--overwrite]
  python -m bihier_jax.convert_esm --from-run WORKDIR [--checkpoint best] --out DIR

PATH: a Hugging Face ESM directory, a fair-esm `.pt` file, or an already converted
directory (local or gs:// / file:// URLs); missing or mis-shaped tensors stop it with
their names. --from-run writes the ESM-2 branch of a trained run's checkpoint, LoRA
adapters merged. Load the result with `bihier_jax.models.esm2.from_pretrained(DIR)`.
Where to get the weights: docs/pretrained.md.
"""

from __future__ import annotations

import argparse
import sys

import jax

from bihier_jax.models.esm2 import checkpoint as esm2_checkpoint


def convert(src: str, out: str, mlm_head: bool = True, overwrite: bool = False) -> str:
  """Converts `src` into `out`; returns a one-line summary."""
  overrides = {} if mlm_head else {"mlm_head": False}
  cfg, params = esm2_checkpoint.load_pretrained(src, **overrides)
  esm2_checkpoint.save(out, cfg, params, source=src, overwrite=overwrite)
  n = sum(int(x.size) for x in jax.tree.leaves(params))
  return (f"{src} ({esm2_checkpoint.detect_format(src)}) -> {out}: {cfg.num_layers} layers, "
          f"width {cfg.embed_dim}, {cfg.num_heads} heads, mlm_head={cfg.mlm_head}, "
          f"{n:,} parameters")


def export_from_run(workdir: str, out: str, checkpoint: str = "",
                    overwrite: bool = False) -> str:
  """Writes the ESM-2 branch of a run's checkpoint (adapters merged) to `out`."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from bihier_jax import config_check  # pylint: disable=g-import-not-at-top
  from bihier_jax import testing
  from bihier_jax.data import layout  # pylint: disable=g-import-not-at-top
  from bihier_jax.models import esm2  # pylint: disable=g-import-not-at-top
  from bihier_jax.training import checkpointing  # pylint: disable=g-import-not-at-top
  from bihier_jax.training import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  config = config_check.load_saved_config(workdir)
  if config.model.kind == "gnn_only":
    raise ValueError(f"{workdir}: model.kind=gnn_only has no ESM-2 branch")
  # Parameter shapes do not depend on the batch: any small one will do.
  example = testing.random_example(16, seed=0, num_classes=int(config.task.num_classes))
  batch = layout.collate([example], layout.budget_for(
      [example], packed_rows=bool(config.data.get("pack_rows", False))))
  mesh = mesh_lib.make_mesh(jax.local_devices()[:1])
  model, params, step = checkpointing.restore_params(config, workdir, checkpoint, batch,
                                                     mesh)
  cfg, esm_params = esm2.merge_lora(model.config.esm, jax.device_get(params["esm"]))
  cfg = dataclasses.replace(cfg, frozen_embedding=False, frozen_layers=0,
                            frozen_final_norm=False, mlm_head=False)
  esm2_checkpoint.save(out, cfg, esm_params, source=f"{workdir} (step {step})",
                       overwrite=overwrite)
  n = sum(int(x.size) for x in jax.tree.leaves(esm_params))
  merged = " (LoRA adapters merged)" if model.config.esm.lora_rank else ""
  return (f"{workdir} step {step} -> {out}: ESM-2 branch{merged}, {cfg.num_layers} "
          f"layers, width {cfg.embed_dim}, {n:,} parameters")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--src", help="HF directory, fair-esm .pt, or converted dir")
  source.add_argument("--from-run", default="", help="a trained fusion run's workdir: "
                      "export its ESM-2 branch (LoRA adapters merged)")
  parser.add_argument("--checkpoint", default="", help="with --from-run: best | latest | "
                      "step (default: best if any checkpoint has validation metrics)")
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--no-mlm-head", action="store_true", help="drop the masked-LM head")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
  args = parser.parse_args(argv)
  try:
    if args.from_run:
      from bihier_jax import config_check  # pylint: disable=g-import-not-at-top
      from bihier_jax.training import checkpointing  # pylint: disable=g-import-not-at-top
      try:
        print(export_from_run(args.from_run, args.out, args.checkpoint, args.overwrite))
      except (config_check.ConfigError, checkpointing.CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
      return 0
    print(convert(args.src, args.out, mlm_head=not args.no_mlm_head, overwrite=args.overwrite))
  except (esm2_checkpoint.CheckpointMismatchError, FileNotFoundError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
