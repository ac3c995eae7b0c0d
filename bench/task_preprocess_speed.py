"""CPU seconds per work item of each benchmark task's `process`, on the test fixtures.

  PYTHONPATH=tests python bench/task_preprocess_speed.py

Builds each task's native-format fixture (real PDB structures, see
tests/fixtures/builders.py), then times `task.process` per item with process CPU time
(robust to other load on the machine) and prints per-item cost, residues/s, and the
extrapolated single-core time for the full dataset sizes of docs/tasks.md.
"""

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from data_pipelines import tasks  # noqa: E402
from fixtures import builders  # noqa: E402

FULL_SIZES = {"react": 37_428, "mqa": 44_214, "lba30": 4_463, "lba60": 4_463,
              "ppbs": 20_000, "bce": 3_756}  # items (docs/tasks.md; PPBS train approx.)


def main():
  root = tempfile.mkdtemp()
  writers = {
      "react": lambda d: builders.write_react(d),
      "mqa": lambda d: builders.write_psr(d, d + "/tmp"),
      "lba30": lambda d: builders.write_lba(d, d + "/tmp"),
      "ppbs": lambda d: builders.write_ppbs(d),
      "bce": lambda d: builders.write_bce(d),
  }
  print("| task | items | CPU ms/item | residues/s | full dataset, 1 core |")
  print("|---|---|---|---|---|")
  for name, write in writers.items():
    raw = os.path.join(root, name)
    os.makedirs(raw)
    write(raw)
    task = tasks.get(name)
    items = task.list_items(raw, None)
    for it in items[:1]:  # warm imports
      try:
        task.process(it)
      except tasks.SkipItem:
        pass
    t0, residues, done = time.process_time(), 0, 0
    for _ in range(3):
      for it in items:
        try:
          residues += sum(ex.num_residues for ex in task.process(it))
          done += 1
        except tasks.SkipItem:
          pass
    cpu = time.process_time() - t0
    per_item = cpu / max(done, 1)
    hours = per_item * FULL_SIZES[name] / 3600
    print(f"| {name} | {done // 3} | {1000 * per_item:.1f} | {residues / cpu:,.0f} | "
          f"{hours:.2f} h |")


if __name__ == "__main__":
  main()
