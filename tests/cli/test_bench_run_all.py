"""bench/run_all.py: discovery, one script's run, report rendering and merging.

Budget: < 5 s (the scripts run here are stand-ins written by the test).
"""

import json
import os
import sys

import pytest

from tests import paths

sys.path.insert(0, paths.BENCH)
import run_all  # pylint: disable=wrong-import-position


def test_discover_filters_by_name():
  names = [os.path.basename(p) for p in run_all.discover()]
  assert "bench_full_model.py" in names and "run_all.py" not in names
  assert [os.path.basename(p) for p in run_all.discover(["full_model"])] == [
      "bench_full_model.py"]
  with pytest.raises(ValueError, match="bench_nope"):
    run_all.discover(["nope"])


def _script(tmp_path, name, body):
  path = tmp_path / name
  path.write_text("import json, sys\n"
                  "args = sys.argv[1:]\n"
                  "out = args[args.index('--json') + 1]\n" + body)
  return str(path)


def test_run_one_success_failure_and_timeout(tmp_path):
  ok = _script(tmp_path, "bench_ok.py",
               "json.dump({'quick': '--quick' in args, 'ms': 1.5}, open(out, 'w'))\n")
  outcome = run_all.run_one(ok, True, 60, str(tmp_path / "ok.json"))
  assert outcome["results"] == {"quick": True, "ms": 1.5} and "error" not in outcome

  bad = _script(tmp_path, "bench_bad.py",
                "json.dump({'partial': 1}, open(out, 'w'))\n"
                "sys.stderr.write('boom\\n'); sys.exit(3)\n")
  outcome = run_all.run_one(bad, False, 60, str(tmp_path / "bad.json"))
  assert outcome["error"] == "exit status 3" and "boom" in outcome["stderr_tail"]
  assert outcome["results"] == {"partial": 1}

  slow = _script(tmp_path, "bench_slow.py", "import time; time.sleep(30)\n")
  outcome = run_all.run_one(slow, False, 1, str(tmp_path / "slow.json"))
  assert outcome["error"] == "timed out after 1 s"


def test_render_tables_and_scalars():
  lines = run_all.render_results({
      "backend": "cpu", "compilations": {"epoch1": 2, "within_bound": True},
      "rows": [{"length": 128, "step_ms": 12.3456}, {"length": 256, "step_ms": 40.0,
                                                     "extra": 1}]})
  text = "\n".join(lines)
  assert "| backend | cpu |" in text
  assert "| compilations.epoch1 | 2 |" in text
  assert "| compilations.within_bound | True |" in text
  assert "| length | step_ms | extra |" in text
  assert "| 128 | 12.35 |  |" in text and "| 256 | 40 | 1 |" in text


def test_report_names_machine_and_merge_keeps_notes(tmp_path):
  machine = run_all.machine_info()
  assert machine["cpu_cores"] >= 1 and machine["cpu"]
  vers = run_all.versions()
  assert "jax" in vers and "numpy" in vers
  report = run_all.render_report(
      machine, vers, {"bench_x": {"results": {"a": 1.0}, "seconds": 2.0},
                      "bench_y": {"error": "timed out after 5 s", "seconds": 5}},
      quick=False, date="2026-01-01 00:00 UTC",
      recorded={"gpu.json": {"measured": "H100, jax 9", "step_ms": 94.4}})
  assert "### gpu.json\n\nMeasured: H100, jax 9.\n\n| figure | value |" in report
  assert "| step_ms | 94.4 |" in report
  assert report.startswith(run_all.BEGIN) and report.rstrip().endswith(run_all.END)
  assert f"{machine['cpu']}, {machine['cpu_cores']} cores" in report
  assert f"jax {vers['jax']}" in report and "2026-01-01" in report
  assert "| bench_y | FAILED: timed out after 5 s | 5 |" in report

  existing = "# Benchmarks\n\nHand-written note.\n\n" + run_all.BEGIN + "\nold\n" + \
      run_all.END + "\n\nTrailing note.\n"
  merged = run_all.merge_into(existing, report)
  assert "Hand-written note." in merged and "Trailing note." in merged
  assert "old" not in merged.replace("bold", "") and merged.count(run_all.BEGIN) == 1
  assert run_all.merge_into(merged, report) == merged  # idempotent
  fresh = run_all.merge_into("", report)
  assert fresh.startswith("# Benchmarks") and report in fresh


def test_main_writes_report(tmp_path, monkeypatch):
  bench_dir = tmp_path / "bench"
  bench_dir.mkdir()
  _script(bench_dir, "bench_fake.py", "json.dump({'value': 3}, open(out, 'w'))\n")
  monkeypatch.setattr(run_all, "BENCH_DIR", str(bench_dir))
  out = tmp_path / "BENCHMARKS.md"
  rc = run_all.main(["--out", str(out), "--json-dir", str(tmp_path / "json")])
  assert rc == 0
  text = out.read_text()
  assert "| bench_fake | ok |" in text and "| value | 3 |" in text
  with open(tmp_path / "json" / "all.json") as f:
    assert json.load(f)["benchmarks"]["bench_fake"]["results"] == {"value": 3}
