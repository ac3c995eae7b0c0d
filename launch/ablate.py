"""Ablation sweeps: fusion depth, fusion mode, direction, baselines; several seeds each.

  python -m launch.ablate --config configs/demo.py --config-arg tiny \
      --sweep fusion_depth --seeds 0,1,2 --local --workdir /tmp/abl

Each (variant, seed) is one run in DIR/<variant>/seed<k>: train, then eval of the
checkpoint selected on validation; `--local` runs them here (`--processes N` through
launch.local), `--emit-commands` prints them (shell lines or launch.slurm_gpu jobs).
Accepted results (`run_status`) go to DIR/ablation_<sweep>_<split>.{csv,md,png}.
Public: sweep_variants, plan_runs, run_status, main. Sweeps, resuming and the tables:
launch/README.md, "Ablations"; which results count: docs/training.md.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.util
import json
import math
import os
import shlex
import subprocess
import sys
import time
from typing import Mapping, Sequence

SWEEPS = ("fusion_depth", "fusion_mode", "direction", "baselines", "comparison")
# The headline question: does bi-hierarchical fusion (either mechanism) beat the
# structure encoder alone and the late-fusion baselines on the same code path?
COMPARISON = (("gnn_only", "gnn_only", None), ("parallel", "parallel", None),
              ("cross", "cross", None), ("bihier_local", "bihier", "local"),
              ("bihier_global", "bihier", "global"))
# Bookkeeping numbers that bihier_jax.eval writes beside the metrics.
NOT_METRICS = frozenset({"step", "num_items"})
# The checkpoint whose results tables accept: the one selected on validation.
SELECTED_CHECKPOINT = "best"


@dataclasses.dataclass(frozen=True)
class Variant:
  """One point of a sweep: a directory-safe name and its config overrides."""
  name: str
  overrides: tuple[tuple[str, str], ...]  # (config path, value as the flag parses it)


def _levels_literal(levels: Sequence[int]) -> str:
  """Python tuple literal that ml_collections parses back: (), (4,), (2,4)."""
  if len(levels) == 1:
    return f"({levels[0]},)"
  return "(" + ",".join(str(k) for k in levels) + ")"


def fusion_depth_levels(num_blocks: int) -> list[tuple[int, ...]]:
  """Fusion level sets from none to every block: (), (K,), (K/2, K), (1..K)."""
  if num_blocks < 1:
    raise ValueError(f"model.gnn.num_blocks={num_blocks}: need at least one GNN block")
  candidates = [(), (num_blocks,), (num_blocks // 2, num_blocks),
                tuple(range(1, num_blocks + 1))]
  out = []
  for levels in candidates:
    levels = tuple(sorted(set(k for k in levels if k >= 1)))
    if levels not in out:
      out.append(levels)
  return out


def sweep_variants(sweep: str, num_blocks: int = 4) -> list[Variant]:
  """The variants of one sweep, in the order they are run, tabled and plotted."""
  if sweep == "fusion_depth":
    # Depth 0 is the `parallel` baseline (final ESM and GNN features concatenated, no
    # exchange): model.kind='bihier' needs at least one fusion level.
    return [Variant("levels_none", (("model.kind", "parallel"),
                                    ("model.fusion.levels", "()")))
            if not lv else
            Variant("levels_" + "-".join(map(str, lv)),
                    (("model.kind", "bihier"),
                     ("model.fusion.levels", _levels_literal(lv))))
            for lv in fusion_depth_levels(num_blocks)]
  if sweep == "fusion_mode":
    return [Variant(f"mode_{m}", (("model.fusion.mode", m),)) for m in ("local", "global")]
  if sweep == "direction":
    return [Variant(f"direction_{d}", (("model.fusion.direction", d),))
            for d in ("bi", "seq2struct", "struct2seq")]
  if sweep == "baselines":
    # Imported here: the model (and JAX) loads only for the sweep that needs its kinds.
    from bihier_jax.models import bihier  # pylint: disable=g-import-not-at-top
    return [Variant(f"kind_{k}", (("model.kind", k),)) for k in bihier.KINDS]
  if sweep == "comparison":
    return [Variant(name, (("model.kind", kind),)
                    + ((("model.fusion.mode", mode),) if mode else ()))
            for name, kind, mode in COMPARISON]
  raise ValueError(f"unknown sweep {sweep!r}; choose from {', '.join(SWEEPS)}")


def load_config(path: str, arg: str | None):
  """Imports a config file and calls its get_config(arg) (no JAX needed)."""
  spec = importlib.util.spec_from_file_location("_ablate_config", path)
  if spec is None or spec.loader is None:
    raise ValueError(f"{path}: not a Python config file")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def parse_sets(items: Sequence[str]) -> tuple[tuple[str, str], ...]:
  out = []
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise ValueError(f"--set {item!r}: expected key=value, e.g. train.num_steps=200")
    out.append((key, value))
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class Run:
  """One training + evaluation of one variant with one seed."""
  variant: Variant
  seed: int
  workdir: str
  config_spec: str  # configs/x.py or configs/x.py:arg
  common: tuple[tuple[str, str], ...]  # --set overrides shared by every run
  processes: int = 1  # JAX processes of each command (launch.local when > 1)
  devices_per_process: int | None = None  # simulated CPU devices of each

  def flags(self) -> list[str]:
    pairs = [*self.common, *self.variant.overrides, ("seed", str(self.seed))]
    if self.processes > 1:
      pairs.append(("train.multi_host", "True"))
    return [f"--config.{k}={v}" for k, v in pairs]

  def _launched(self, argv: list[str], python: str) -> list[str]:
    """`argv` as the processes of one job here (launch.local), or as it is."""
    if self.processes <= 1:
      return argv
    devices = ([f"--devices-per-process={self.devices_per_process}"]
               if self.devices_per_process else [])
    return [python, "-m", "launch.local", f"--processes={self.processes}", *devices,
            f"--log-dir={os.path.join(self.workdir, 'launch_logs')}", "--", *argv]

  def train_argv(self, python: str = "python") -> list[str]:
    return self._launched([python, "-m", "bihier_jax.train",
                           f"--config={self.config_spec}", f"--workdir={self.workdir}",
                           *self.flags()], python)

  def eval_argv(self, python: str = "python") -> list[str]:
    return self._launched([python, "-m", "bihier_jax.eval",
                           f"--config={self.config_spec}", f"--workdir={self.workdir}",
                           f"--checkpoint={SELECTED_CHECKPOINT}", *self.flags()], python)

  def override(self, key: str) -> str | None:
    """The value this run's flags give `key` (the last one wins), else None."""
    values = [v for k, v in (*self.common, *self.variant.overrides) if k == key]
    return values[-1] if values else None

  def eval_json(self, split: str) -> str:
    return os.path.join(self.workdir, "eval", f"{split}.json")


def plan_runs(variants: Sequence[Variant], seeds: Sequence[int], workdir: str,
              config_spec: str, common: tuple[tuple[str, str], ...] = (), *,
              processes: int = 1, devices_per_process: int | None = None) -> list[Run]:
  """Every (variant, seed), variant-major so a partial sweep covers whole variants."""
  return [Run(v, s, os.path.join(workdir, v.name, f"seed{s}"), config_spec, common,
              processes, devices_per_process)
          for v in variants for s in seeds]


def emit_commands(runs: Sequence[Run], launcher: str = "shell") -> list[str]:
  """Shell lines that run the sweep elsewhere."""
  lines = []
  for run in runs:
    if launcher == "shell":
      lines.append(f"{shlex.join(run.train_argv())} && {shlex.join(run.eval_argv())}")
    elif launcher == "slurm":
      sets = [a for (k, v) in (*run.common, *run.variant.overrides, ("seed", str(run.seed)))
              for a in ("--set", f"{k}={v}")]
      lines.append(shlex.join([
          "python", "-m", "launch.slurm_gpu", f"--config={run.config_spec}",
          f"--workdir={run.workdir}", f"--job-name={run.variant.name}-seed{run.seed}",
          f"--script={run.workdir}.sbatch", "--eval", *sets]))
    else:
      raise ValueError(f"unknown launcher {launcher!r}; choose shell or slurm")
  return lines


def read_eval_json(path: str) -> dict:
  """An eval/<split>.json as a dict; ValueError if it is not a JSON object."""
  with open(path) as f:
    try:
      result = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(result, dict):
    raise ValueError(f"{path}: expected an object of metric name -> number")
  return result


@dataclasses.dataclass(frozen=True)
class Status:
  """What a run needs before its result counts: 'done', 'evaluate' or 'train'."""
  action: str
  reason: str


def run_status(run: Run, split: str) -> Status:
  """Whether `run`'s eval/<split>.json is its selected checkpoint's, current result.

  'train': no config.json or checkpoints, fewer steps than train.num_steps (this run's
  flag, else its config.json), or no checkpoint with validation metrics (a restarted
  train adds them to its last checkpoint). 'evaluate': trained, but the JSON is missing,
  unreadable, of another checkpoint than "best", of another step than the best one
  now, or not newer than that checkpoint. 'done' otherwise.
  """
  config_path = os.path.join(run.workdir, "config.json")
  if not (os.path.exists(config_path)
          and os.path.isdir(os.path.join(run.workdir, "checkpoints"))):
    return Status("train", "not trained")
  with open(config_path) as f:
    config = json.load(f)
  num_steps = int(run.override("train.num_steps") or config["train"]["num_steps"])
  # Imported here: --emit-commands needs no JAX or Orbax.
  from bihier_jax.training import checkpointing  # pylint: disable=g-import-not-at-top
  from bihier_jax import cli  # pylint: disable=g-import-not-at-top
  cli.quiet_library_logs()  # no "read only" warning per run
  ckpt = checkpointing.Checkpointer(run.workdir, read_only=True,
                                    select_metric=config["task"]["select_metric"],
                                    select_mode=config["task"]["select_mode"])
  try:
    latest, best = ckpt.latest_step(), ckpt.best_step()
    best_time = ckpt.checkpoint_time(best) if best is not None else 0.0
  finally:
    ckpt.close()
  if latest is None or latest < num_steps:
    return Status("train", f"trained to step {latest or 0} of {num_steps}")
  if best is None:
    return Status("train", "no checkpoint has validation metrics to select from")
  path = run.eval_json(split)
  if not os.path.exists(path):
    return Status("evaluate", f"no {os.path.relpath(path, run.workdir)}")
  try:
    result = read_eval_json(path)
  except ValueError as e:
    return Status("evaluate", str(e))
  if result.get("checkpoint") != SELECTED_CHECKPOINT:
    return Status("evaluate", f"result of checkpoint {result.get('checkpoint')!r}, not "
                  f"{SELECTED_CHECKPOINT!r}")
  if result.get("step") != best:
    return Status("evaluate", f"result of step {result.get('step')}, the best "
                  f"checkpoint is step {best}")
  if os.path.getmtime(path) <= best_time:
    return Status("evaluate", f"result older than the best checkpoint (step {best})")
  return Status("done", f"best checkpoint, step {best}")


def run_locally(runs: Sequence[Run], split: str, python: str = sys.executable,
                env: Mapping[str, str] | None = None) -> list[Run]:
  """Brings each run to a result that counts (`run_status`); returns those that failed.

  'done' runs are skipped; 'evaluate' runs only `bihier_jax.eval --checkpoint best`;
  'train' runs train (which resumes) and then eval. Output goes to <run>/ablate.log.
  """
  failed = []
  for i, run in enumerate(runs):
    tag = f"[{i + 1}/{len(runs)}] {run.variant.name} seed {run.seed}"
    status = run_status(run, split)
    if status.action == "done":
      print(f"{tag}: done already ({status.reason}), skipped", flush=True)
      continue
    commands = [run.eval_argv(python)]
    if status.action == "train":
      commands.insert(0, run.train_argv(python))
    print(f"{tag}: {status.reason}: {'training' if len(commands) > 1 else 'evaluating'}",
          flush=True)
    os.makedirs(run.workdir, exist_ok=True)
    log_path = os.path.join(run.workdir, "ablate.log")
    start = time.time()
    with open(log_path, "a") as log:
      for argv in commands:
        log.write(f"$ {shlex.join(argv)}\n")
        log.flush()
        rc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                            check=False).returncode
        if rc != 0:
          break
    after = run_status(run, split) if rc == 0 else Status("failed", f"exit {rc}")
    if after.action != "done":
      print(f"{tag}: FAILED ({after.reason}); see {log_path}", flush=True)
      failed.append(run)
    else:
      print(f"{tag}: {time.time() - start:.0f} s", flush=True)
  return failed


# --- aggregation ------------------------------------------------------------------------


def collect_results(runs: Sequence[Run], split: str) -> list[dict]:
  """Rows {variant, seed, step, <metric>: value}, one per run whose result counts.

  Numeric entries are metrics, except the bookkeeping in `NOT_METRICS`. A result that
  does not count (`run_status`: not the selected checkpoint's, or stale) is left out
  and named on stderr; a JSON that cannot be read raises ValueError.
  """
  rows = []
  for run in runs:
    path = run.eval_json(split)
    if not os.path.exists(path):
      continue
    metrics = read_eval_json(path)
    status = run_status(run, split)
    if status.action != "done":
      print(f"ignored {path}: {status.reason}", file=sys.stderr)
      continue
    row = {"variant": run.variant.name, "seed": run.seed, "step": int(metrics["step"])}
    for name, value in metrics.items():
      if (isinstance(value, (int, float)) and not isinstance(value, bool)
          and name not in NOT_METRICS):
        row[name] = float(value)
    rows.append(row)
  return rows


def metric_names(rows: Sequence[dict]) -> list[str]:
  names = []
  for row in rows:
    for key in row:
      if key not in ("variant", "seed", "step") and key not in names:
        names.append(key)
  return names


def summarize(rows: Sequence[dict]) -> dict[str, dict[str, tuple[float, float, int]]]:
  """variant -> metric -> (mean, sample std with ddof=1 (nan if n < 2), n).

  Non-finite values (a diverged run) are kept: they make the mean non-finite, which the
  table shows rather than hides.
  """
  out: dict[str, dict[str, tuple[float, float, int]]] = {}
  names = metric_names(rows)
  for variant in dict.fromkeys(r["variant"] for r in rows):
    out[variant] = {}
    for name in names:
      values = [r[name] for r in rows if r["variant"] == variant and name in r]
      n = len(values)
      if n == 0:
        continue
      mean = sum(values) / n
      std = (math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
             if n >= 2 else float("nan"))
      out[variant][name] = (mean, std, n)
  return out


def write_csv(rows: Sequence[dict], path: str) -> None:
  names = metric_names(rows)
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["variant", "seed", "step", *names])
    for row in rows:
      writer.writerow([row["variant"], row["seed"], row.get("step", ""),
                       *(repr(row[n]) if n in row else "" for n in names)])


def _cell(mean: float, std: float, n: int, digits: int) -> str:
  if math.isnan(std):
    return f"{mean:.{digits}f} (n={n})"
  return f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(summary: Mapping[str, Mapping[str, tuple[float, float, int]]],
                   digits: int = 3) -> str:
  """Variants as rows, metrics as columns, cells 'mean ± std'."""
  names = []
  for per_metric in summary.values():
    names += [n for n in per_metric if n not in names]
  lines = ["| variant | seeds | " + " | ".join(names) + " |",
           "|---|---|" + "---|" * len(names)]
  for variant, per_metric in summary.items():
    n_seeds = max((n for (_, _, n) in per_metric.values()), default=0)
    cells = [(_cell(*per_metric[n], digits) if n in per_metric else "—") for n in names]
    lines.append(f"| {variant} | {n_seeds} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def bar_plot(summary: Mapping[str, Mapping[str, tuple[float, float, int]]], metric: str,
             path: str, title: str = "", rows: Sequence[dict] = ()) -> None:
  """Bar per variant of `metric` (mean) with ±1 sample-std error bars; PNG.

  With `rows`, each seed's value is drawn as a dot on its bar.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  variants = [v for v in summary if metric in summary[v]]
  if not variants:
    raise ValueError(f"metric {metric!r} is in no result")
  means = [summary[v][metric][0] for v in variants]
  stds = [0.0 if math.isnan(summary[v][metric][1]) else summary[v][metric][1]
          for v in variants]
  fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(variants) + 1.5), 3.6))
  ax.bar(range(len(variants)), means, yerr=stds, capsize=4, color="#4C72B0",
         edgecolor="black", linewidth=0.6)
  for i, variant in enumerate(variants):
    seeds = [r[metric] for r in rows if r["variant"] == variant and metric in r]
    ax.plot([i] * len(seeds), seeds, "o", color="black", markersize=3, zorder=3)
  ax.set_xticks(range(len(variants)))
  ax.set_xticklabels(variants, rotation=20, ha="right")
  ax.set_ylabel(metric)
  if title:
    ax.set_title(title, fontsize=10)
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


@dataclasses.dataclass
class Outputs:
  csv: str
  markdown: str
  png: str | None


def aggregate(runs: Sequence[Run], workdir: str, sweep: str, split: str,
              metric: str | None = None, caption: str = "") -> Outputs | None:
  """Writes CSV, Markdown and PNG of the results that count; None if none does."""
  rows = collect_results(runs, split)
  if not rows:
    return None
  summary = summarize(rows)
  names = metric_names(rows)
  if metric is None or metric not in names:
    metric = names[0]
  stem = os.path.join(workdir, f"ablation_{sweep}_{split}")
  write_csv(rows, stem + ".csv")
  header = (f"Ablation `{sweep}`, split `{split}`: mean ± sample std (ddof=1) over "
            f"seeds; n shown where a variant has one seed.\n\n")
  with open(stem + ".md", "w") as f:
    f.write(header + markdown_table(summary) + (f"\n{caption}\n" if caption else ""))
  png = stem + ".png"
  bar_plot(summary, metric, png, title=f"{sweep} ({split}): {metric}, mean ± std",
           rows=rows)
  return Outputs(stem + ".csv", stem + ".md", png)


# --- command line -----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m launch.ablate", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True, help="configs/<task>.py")
  p.add_argument("--config-arg", default="", help="config variant, e.g. tiny")
  p.add_argument("--sweep", required=True, choices=SWEEPS)
  p.add_argument("--seeds", default="0,1,2", help="comma-separated, e.g. 0,1,2")
  p.add_argument("--workdir", required=True)
  mode = p.add_mutually_exclusive_group(required=True)
  mode.add_argument("--local", action="store_true", help="run here, one after another")
  mode.add_argument("--emit-commands", action="store_true", help="print commands only")
  mode.add_argument("--aggregate-only", action="store_true",
                    help="only gather the results that count into CSV/Markdown/PNG")
  p.add_argument("--only", default="", help="comma-separated variant names to keep")
  p.add_argument("--launcher", default="shell", choices=("shell", "slurm"),
                 help="form of --emit-commands lines")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="config override for every run (repeatable)")
  p.add_argument("--split", default="", help="eval split to gather (default: the "
                 "config's last eval split, else test)")
  p.add_argument("--metric", default="", help="metric to plot (default: the config's "
                 "task.select_metric)")
  p.add_argument("--caption", default="", help="text appended under the table")
  p.add_argument("--processes", type=int, default=1,
                 help="JAX processes per command, started here by launch.local "
                 "(train.multi_host=True)")
  p.add_argument("--devices-per-process", type=int, default=None,
                 help="with --processes: simulated CPU devices of each process")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    common = parse_sets(args.set)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  config = load_config(args.config, args.config_arg or None)
  num_blocks = int(config.model.gnn.num_blocks)
  for key, value in common:  # a --set of the block count changes the depth sweep
    if key == "model.gnn.num_blocks":
      num_blocks = int(value)
  split = args.split or (tuple(config.data.eval_splits) or ("test",))[-1]
  metric = args.metric or str(config.task.select_metric)
  spec = args.config + (f":{args.config_arg}" if args.config_arg else "")
  variants = sweep_variants(args.sweep, num_blocks)
  if args.only:
    keep = [v.strip() for v in args.only.split(",") if v.strip()]
    unknown = set(keep) - {v.name for v in variants}
    if unknown:
      print(f"error: --only {sorted(unknown)}: not in sweep {args.sweep} "
            f"({', '.join(v.name for v in variants)})", file=sys.stderr)
      return 2
    variants = [v for v in variants if v.name in keep]
  if args.processes < 1 or (args.devices_per_process is not None
                            and args.devices_per_process < 1):
    print(f"error: --processes {args.processes} / --devices-per-process "
          f"{args.devices_per_process}: need at least 1", file=sys.stderr)
    return 2
  runs = plan_runs(variants, seeds, args.workdir, spec, common,
                   processes=args.processes, devices_per_process=args.devices_per_process)

  if args.emit_commands:
    print("\n".join(emit_commands(runs, args.launcher)))
    return 0
  failed = []
  if args.local:
    env = dict(os.environ)
    env.setdefault("USE_TF", "0")
    failed = run_locally(runs, split, env=env)
  outputs = aggregate(runs, args.workdir, args.sweep, split, metric, args.caption)
  if outputs is None:
    print(f"no results under {args.workdir} for split {split!r}", file=sys.stderr)
    return 1
  print(f"wrote {outputs.csv}\nwrote {outputs.markdown}\nwrote {outputs.png}")
  with open(outputs.markdown) as f:
    print(f.read())
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
