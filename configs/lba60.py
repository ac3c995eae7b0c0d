"""Ligand binding affinity, ATOM3D LBA split at 60% sequence identity (see lba30.py).

  python -m data_pipelines.preprocess lba60 --raw RAW --out PREPARED
  python -m bihier_jax.train --config configs/lba60.py --workdir W --config.data.dir=PREPARED

The released 60% LMDB has been reported to hold 3,563 train / 452 test complexes rather
than the paper's 3,678 / 460 / 460 (atom3d #54): the preprocessing metadata gives the
counts actually read.
"""

from configs import lba30


def get_config(arg: str | None = None):
  return lba30.get_config(arg, identity=60)
