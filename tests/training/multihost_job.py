"""The demo's tiny config trained, evaluated and predicted in one process of a job.

tests/training/test_multihost.py runs it alone (one process, 8 simulated devices) and under
`python -m launch.local --processes 2 --devices-per-process 4` (with --multi-host), so
each launch pays JAX's start-up once for several library calls:

  python tests/training/multihost_job.py --data DIR [--multi-host] [--fsdp F] \
      [--train WORKDIR]... [--continue WORKDIR]... [--continue-fsdp-1 WORKDIR]... \
      [--kill-at-save STEP] \
      [--evaluate WORKDIR] [--predict WORKDIR OUT]

--train runs `train_lib.train_and_evaluate` for each WORKDIR in turn (resuming what is
there), --continue likewise without evaluations (and --continue-fsdp-1 with
train.fsdp=1), for runs that only their losses are checked of; with --kill-at-save the process
SIGKILLs itself when the training loop asks for the checkpoint of STEP (the earlier
ones complete), a crash between two saves.
--evaluate runs `inference.evaluate_checkpoint` (the best checkpoint; files under
WORKDIR/eval), --predict `inference.predict_structures` on three demo chains.
--fail-on-process K: process K (SLURM_PROCID) exits with status 3 at once, the others
sleep (launch.local's failure handling, no JAX).
"""

import argparse
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

# The demo's chains that the predict check reads (real MDAnalysisTests structures).
PREDICT_CHAINS = ("1ahsA.pdb.gz", "1eteA.pdb.gz", "3q4oA.pdb.gz")
NUM_STEPS = 4


def config(data_dir: str, multi_host: bool, fsdp: int, evaluate: bool = True):
  """The tiny demo at a global batch of 8 (one protein per device), evaluated every 2
  steps (not at all without `evaluate`: the losses are the same), a checkpoint every
  step, all kept (the tests continue runs from earlier ones)."""
  from configs import demo  # pylint: disable=g-import-not-at-top
  c = demo.get_config("tiny")
  c.data.dir = data_dir
  c.train.batch_size = 8
  c.train.num_steps = NUM_STEPS
  c.train.eval_every = 2
  c.train.checkpoint_every = 1
  c.train.keep_checkpoints = 10
  c.train.fsdp = fsdp
  c.train.multi_host = multi_host
  if not evaluate:
    c.data.eval_splits, c.data.select_split = (), ""
  return c


def _kill_at_save(step: int) -> None:
  from bihier_jax.training import checkpointing  # pylint: disable=g-import-not-at-top
  save = checkpointing.Checkpointer.save

  def save_or_die(self, at, *args, **kwargs):
    if at == step:
      self.wait()  # the checkpoints before it are whole on disk
      sys.stdout.flush()
      os.kill(os.getpid(), signal.SIGKILL)
    return save(self, at, *args, **kwargs)

  checkpointing.Checkpointer.save = save_or_die


def main(argv=None) -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--data", required=True)
  p.add_argument("--multi-host", action="store_true")
  p.add_argument("--fsdp", type=int, default=1)
  p.add_argument("--train", action="append", default=[])
  p.add_argument("--continue", dest="resume", action="append", default=[])
  p.add_argument("--continue-fsdp-1", dest="resume_fsdp_1", action="append", default=[])
  p.add_argument("--kill-at-save", type=int, default=None)
  p.add_argument("--evaluate", default=None)
  p.add_argument("--predict", nargs=2, default=None, metavar=("WORKDIR", "OUT"))
  p.add_argument("--fail-on-process", type=int, default=None)
  args = p.parse_args(argv)
  if args.fail_on_process is not None:  # no JAX: launch.local's failure handling
    rank, count = (int(os.environ.get(k, d)) for k, d in (("SLURM_PROCID", 0),
                                                          ("SLURM_NTASKS", 1)))
    if rank == args.fail_on_process:
      print(f"process {rank} of {count} fails", flush=True)
      sys.exit(3)
    time.sleep(600)
    return
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.INFO)  # "resumed from checkpoint ..." and the like
  from bihier_jax.training import inference  # pylint: disable=g-import-not-at-top
  from bihier_jax.training import train_lib  # pylint: disable=g-import-not-at-top
  cfg = config(args.data, args.multi_host, args.fsdp)
  if args.kill_at_save is not None:
    _kill_at_save(args.kill_at_save)
  for workdir in args.train:
    train_lib.train_and_evaluate(cfg, workdir)
  for workdir in args.resume:
    train_lib.train_and_evaluate(config(args.data, args.multi_host, args.fsdp, False),
                                 workdir)
  for workdir in args.resume_fsdp_1:
    train_lib.train_and_evaluate(config(args.data, args.multi_host, 1, False), workdir)
  if args.evaluate:
    inference.evaluate_checkpoint(cfg, args.evaluate, "best")
  if args.predict:
    from bihier_jax.data import from_files  # pylint: disable=g-import-not-at-top
    from data_pipelines import demo as demo_task  # pylint: disable=g-import-not-at-top
    paths = [os.path.join(demo_task.default_raw_dir(), f) for f in PREDICT_CHAINS]
    loaded = from_files.load(paths, **from_files.load_options(cfg))
    workdir, out = args.predict
    inference.predict_structures(cfg, workdir, loaded, out=out, checkpoint="best",
                                 progress=False)


if __name__ == "__main__":
  main()
