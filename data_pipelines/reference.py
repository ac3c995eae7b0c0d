"""Our split and subset sizes next to the literature's, with every shortfall explained.

A task may carry `reference_counts` (a `ReferenceCounts`): the number of examples per
split or subset that the papers and reference code report. After preprocessing,
`compare` sets our counts (from the manifest) beside them, and every example short of
the reference is accounted for: skipped items by reason, and items the raw files did
not list at all (a partial download, `--limit`). `format_table` prints it.
"""

from __future__ import annotations

import collections
import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class ReferenceCounts:
  """Published sizes of a task's splits or subsets.

  Attributes:
    source: where the numbers come from (paper, reference code, files).
    unit: what is counted ("chains", "complexes", ...).
    by: how a manifest line is keyed: "split", "group", or "split/group".
    counts: key -> count, in the order to print.
  """
  source: str
  unit: str
  by: str
  counts: dict[str, int]


def subset_key(line: dict, by: str) -> str:
  """The key of a manifest line under `by` ("split", "group", "split/group")."""
  if by == "split":
    return line["split"]
  if by == "group":
    return line.get("group", "") or line["split"]
  return f"{line['split']}/{line.get('group', '')}"


def reason_kind(line: dict) -> str:
  """A skip reason without the item's particulars, to count reasons across items."""
  if line.get("reason_kind"):
    return line["reason_kind"]
  reason = line["reason"].replace(line["source"], "").lstrip(": ")
  return re.sub(r"\d+", "#", reason)[:80]


def compare(reference: ReferenceCounts, manifest: list[dict]) -> dict:
  """Per key: our examples, the reference count, the difference and its reasons.

  Returns:
    {key: {"examples", "reference", "difference" (ours − reference), "items",
    "reasons": {reason: items}}}, keys of the reference first, then any other key of
    the manifest (reference None).
  """
  lines = collections.defaultdict(list)
  for line in manifest:
    lines[subset_key(line, reference.by)].append(line)
  out = {}
  for key in list(reference.counts) + sorted(set(lines) - set(reference.counts)):
    rows = lines.get(key, [])
    expected = reference.counts.get(key)
    examples = sum(m["examples"] for m in rows if m["status"] == "ok")
    reasons = collections.Counter(reason_kind(m) for m in rows if m["status"] != "ok")
    if expected is not None and len(rows) < expected:
      reasons["not listed in the raw files (partial download or --limit)"] = (
          expected - len(rows))
    out[key] = {"examples": examples, "reference": expected,
                "difference": None if expected is None else examples - expected,
                "items": len(rows), "reasons": dict(reasons.most_common())}
  return out


def format_table(task: str, reference: ReferenceCounts, comparison: dict) -> str:
  """The comparison as aligned text lines, reasons under each short subset."""
  rows = [f"{task}: {reference.unit} per {reference.by} vs. {reference.source}",
          f"  {'subset':<16}{'ours':>9}{'reference':>11}{'difference':>12}"]
  for key, c in comparison.items():
    ref = "—" if c["reference"] is None else f"{c['reference']:,}"
    diff = "" if c["difference"] is None else f"{c['difference']:+,}"
    rows.append(f"  {key:<16}{c['examples']:>9,}{ref:>11}{diff:>12}")
    for reason, n in c["reasons"].items():
      rows.append(f"      {n:>7,} × {reason}")
  return "\n".join(rows)
