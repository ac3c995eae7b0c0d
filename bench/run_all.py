"""Runs every bench/bench_*.py and rewrites the generated part of BENCHMARKS.md.

  python bench/run_all.py [--quick] [--only esm2_cpu,full_model] [--timeout 1800]
                          [--out BENCHMARKS.md] [--json-dir DIR]

Each benchmark script takes `--json PATH` (a dict of results) and `--quick`. They run
one after another in fresh processes (so one script's compilations, threads and memory
do not touch the next), each with a time limit; a failure is written into the report
rather than stopping the suite. The report names the machine (CPU model, cores, memory,
GPU when present), package versions and the date; figures recorded on other machines
(bench/*.json, e.g. an H100 run of `bench_full_model.py --gpu`) follow, each naming its
own machine. Text outside the markers
`<!-- bench/run_all.py: begin -->` / `<!-- ... end -->` in BENCHMARKS.md is kept, so
hand-written notes survive a rerun.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Mapping, Sequence

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
BEGIN = "<!-- bench/run_all.py: begin (generated; edit outside these markers) -->"
END = "<!-- bench/run_all.py: end -->"
PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "tensorflow-cpu", "tensorflow",
            "torch")


def discover(only: Sequence[str] = ()) -> list[str]:
  """Paths of bench/bench_*.py, sorted; `only` filters by name (with or without bench_)."""
  paths = sorted(glob.glob(os.path.join(BENCH_DIR, "bench_*.py")))
  if only:
    wanted = {o if o.startswith("bench_") else f"bench_{o}" for o in only}
    paths = [p for p in paths if os.path.basename(p)[:-3] in wanted]
    missing = wanted - {os.path.basename(p)[:-3] for p in paths}
    if missing:
      raise ValueError(f"no benchmark script named {sorted(missing)} in {BENCH_DIR}")
  return paths


def recorded_results() -> dict[str, Any]:
  """bench/*.json: figures measured on other machines (e.g. a GPU) and kept in the repo.

  Each is a dict with 'measured' (machine, versions, date) and the results.
  """
  out = {}
  for path in sorted(glob.glob(os.path.join(BENCH_DIR, "*.json"))):
    with open(path) as f:
      try:
        out[os.path.basename(path)] = json.load(f)
      except json.JSONDecodeError as e:
        out[os.path.basename(path)] = {"error": f"not valid JSON: {e}"}
  return out


def _read(path: str) -> str:
  try:
    with open(path) as f:
      return f.read()
  except OSError:
    return ""


def machine_info() -> dict[str, Any]:
  """CPU model, cores, memory, GPU names (nvidia-smi), OS, Python."""
  cpu = platform.processor() or platform.machine()
  for line in _read("/proc/cpuinfo").splitlines():
    if line.startswith("model name"):
      cpu = line.split(":", 1)[1].strip()
      break
  mem_gib = None
  for line in _read("/proc/meminfo").splitlines():
    if line.startswith("MemTotal:"):
      mem_gib = round(int(line.split()[1]) / 2**20, 1)
  try:
    usable = len(os.sched_getaffinity(0))
  except AttributeError:
    usable = os.cpu_count()
  gpus = []
  if shutil.which("nvidia-smi"):
    try:
      out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total",
                            "--format=csv,noheader"], capture_output=True, text=True,
                           timeout=30, check=False).stdout
      gpus = [line.strip() for line in out.splitlines() if line.strip()]
    except (OSError, subprocess.SubprocessError):
      pass
  return {"cpu": cpu, "cpu_cores": os.cpu_count(), "cpu_cores_usable": usable,
          "memory_gib": mem_gib, "gpus": gpus,
          "os": f"{platform.system()} {platform.release()}",
          "python": platform.python_version()}


def versions() -> dict[str, str]:
  """Installed versions (metadata only: nothing is imported)."""
  out = {}
  for name in PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


def run_one(path: str, quick: bool, timeout: int, json_path: str) -> dict[str, Any]:
  """Runs one script; returns {'results': ..., 'seconds': ...} or {'error': ...}."""
  cmd = [sys.executable, path, "--json", json_path] + (["--quick"] if quick else [])
  # The repository root on the path: scripts import bihier_jax without an install.
  path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH", "")) if p)
  env = dict(os.environ, USE_TF="0", TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1",
             PYTHONPATH=path)
  start = time.time()
  try:
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout} s", "seconds": timeout}
  seconds = round(time.time() - start, 1)
  results = None
  if os.path.exists(json_path):
    try:
      with open(json_path) as f:
        results = json.load(f)
    except json.JSONDecodeError as e:
      return {"error": f"--json output is not JSON: {e}", "seconds": seconds}
  if proc.returncode != 0 or results is None:
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
    out = {"error": f"exit status {proc.returncode}", "stderr_tail": tail,
           "seconds": seconds}
    if results is not None:
      out["results"] = results  # partial results still go in the report
    return out
  return {"results": results, "seconds": seconds}


# --- rendering ---------------------------------------------------------------------------


def _fmt(value: Any) -> str:
  if isinstance(value, bool) or value is None:
    return str(value)
  if isinstance(value, float):
    if value != value or value in (float("inf"), float("-inf")):
      return str(value)
    if value == 0 or 1e-3 <= abs(value) < 1e6:
      return f"{value:.4g}"
    return f"{value:.3e}"
  if isinstance(value, (list, tuple)) and all(not isinstance(v, (dict, list))
                                               for v in value):
    return ", ".join(_fmt(v) for v in value)
  return str(value).replace("|", "\\|").replace("\n", " ")


def _flatten(d: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
  items = []
  for key, value in d.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      items += _flatten(value, name + ".")
    else:
      items.append((name, value))
  return items


def _is_table(value: Any) -> bool:
  return (isinstance(value, list) and bool(value)
          and all(isinstance(v, Mapping) for v in value))


def render_value(name: str, value: Any) -> list[str]:
  """Markdown lines for one result: a list of records becomes a table."""
  if _is_table(value):
    columns = []
    for row in value:
      columns += [k for k, _ in _flatten(row) if k not in columns]
    lines = [f"**{name}**", "", "| " + " | ".join(columns) + " |",
             "|" + "---|" * len(columns)]
    for row in value:
      flat = dict(_flatten(row))
      lines.append("| " + " | ".join(_fmt(flat.get(c, "")) for c in columns) + " |")
    return lines + [""]
  return []


def render_results(results: Mapping[str, Any]) -> list[str]:
  """Scalars (flattened) in one two-column table, then one table per list of records."""
  scalars, tables = [], []
  for name, value in _flatten(results) if isinstance(results, Mapping) else [
      ("result", results)]:
    if _is_table(value):
      tables += render_value(name, value)
    else:
      scalars.append((name, value))
  lines = []
  if scalars:
    lines += ["| figure | value |", "|---|---|"]
    lines += [f"| {n} | {_fmt(v)} |" for n, v in scalars]
    lines.append("")
  return lines + tables


def render_report(machine: Mapping[str, Any], vers: Mapping[str, str],
                  outcomes: Mapping[str, Mapping[str, Any]], quick: bool,
                  date: str, recorded: Mapping[str, Any] | None = None) -> str:
  gpu = "; ".join(machine.get("gpus") or []) or "none"
  lines = [
      BEGIN,
      "",
      f"Generated by `python bench/run_all.py{' --quick' if quick else ''}` on {date}.",
      "",
      "**Machine**: " + f"{machine['cpu']}, {machine['cpu_cores']} cores "
      f"({machine['cpu_cores_usable']} usable by this process), "
      f"{machine['memory_gib']} GiB memory; GPU: {gpu}; {machine['os']}, "
      f"Python {machine['python']}.",
      "",
      "**Versions**: " + ", ".join(f"{k} {v}" for k, v in vers.items()) + ".",
      "",
  ]
  if quick:
    lines += ["These are `--quick` figures (small sizes, few repeats): a smoke test of "
              "the suite, not numbers to compare.", ""]
  lines += ["| benchmark | status | seconds |", "|---|---|---|"]
  for name, outcome in outcomes.items():
    status = "ok" if "error" not in outcome else f"FAILED: {_fmt(outcome['error'])}"
    lines.append(f"| {name} | {status} | {_fmt(outcome.get('seconds'))} |")
  lines.append("")
  for name, outcome in outcomes.items():
    lines += [f"### {name}", ""]
    if "error" in outcome:
      lines += [f"Failed: {outcome['error']}.", ""]
      if outcome.get("stderr_tail"):
        lines += ["```", outcome["stderr_tail"], "```", ""]
    if "results" in outcome:
      lines += render_results(outcome["results"])
  if recorded:
    lines += ["## Recorded on other machines", "",
              "Kept in `bench/*.json` (not rerun by this script); each names its machine.",
              ""]
    for name, results in recorded.items():
      lines += [f"### {name}", ""]
      if isinstance(results, Mapping) and "measured" in results:
        lines += [f"Measured: {_fmt(results['measured'])}.", ""]
        results = {k: v for k, v in results.items() if k != "measured"}
      lines += render_results(results)
  lines.append(END)
  return "\n".join(lines) + "\n"


def merge_into(existing: str, generated: str) -> str:
  """Replaces the generated block of `existing` (or appends it); keeps the rest."""
  if BEGIN in existing and END in existing:
    head = existing[:existing.index(BEGIN)]
    tail = existing[existing.index(END) + len(END):].lstrip("\n")
    return head + generated + (("\n" + tail) if tail else "")
  if not existing.strip():
    existing = ("# Benchmarks\n\nFigures measured by the scripts in `bench/`; every number "
                "names the machine it was measured on.\n")
  return existing.rstrip("\n") + "\n\n" + generated


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="pass --quick to every script")
  p.add_argument("--only", default="", help="comma-separated script names")
  p.add_argument("--timeout", type=int, default=1800, help="seconds per script")
  p.add_argument("--out", default=os.path.join(REPO, "BENCHMARKS.md"))
  p.add_argument("--json-dir", default="", help="keep each script's JSON here")
  args = p.parse_args(argv)

  try:
    scripts = discover([o.strip() for o in args.only.split(",") if o.strip()])
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if not scripts:
    print(f"no bench_*.py in {BENCH_DIR}", file=sys.stderr)
    return 2
  json_dir = args.json_dir or tempfile.mkdtemp(prefix="bench_json_")
  os.makedirs(json_dir, exist_ok=True)
  outcomes = {}
  for path in scripts:
    name = os.path.basename(path)[:-3]
    print(f"{name} ...", flush=True)
    outcomes[name] = run_one(path, args.quick, args.timeout,
                             os.path.join(json_dir, f"{name}.json"))
    print(f"  {'ok' if 'error' not in outcomes[name] else outcomes[name]['error']} "
          f"({outcomes[name].get('seconds')} s)", flush=True)
  date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  report = render_report(machine_info(), versions(), outcomes, args.quick, date,
                         recorded_results())
  with open(args.out, "w") as f:
    f.write(merge_into(_read(args.out), report))
  with open(os.path.join(json_dir, "all.json"), "w") as f:
    json.dump({"machine": machine_info(), "versions": versions(), "date": date,
               "benchmarks": outcomes}, f, indent=1)
  print(f"wrote {args.out} (JSON in {json_dir})")
  return 1 if any("error" in o for o in outcomes.values()) else 0


if __name__ == "__main__":
  sys.exit(main())
