"""Overlapping ESM windows for long chains (`data.windows`) and windowed batches
(`layout.collate` with a windowed budget)."""

import dataclasses

import numpy as np
import pytest

from bihier_jax import testing
from bihier_jax.common import residue_constants as rc
from bihier_jax.data import layout
from bihier_jax.data import windows


@pytest.mark.parametrize("window", [8, 30, 1022])
def test_windows_cover_each_chain_with_overlaps_of_a_quarter(window):
  for length in range(1, 4 * window + 50, max(1, window // 7)):
    starts = windows.window_starts(length, window)
    assert starts[0] == 0 and np.all(np.diff(starts) > 0)
    if length <= window:
      assert starts.tolist() == [0]
      continue
    assert starts[-1] + window == length
    assert np.all(starts[:-1] + window - starts[1:] >= window // 4)
    # As few windows as the overlap allows: one fewer cannot overlap that much.
    fewer = len(starts) - 1
    assert fewer < 2 or (length - window) / (fewer - 1) > window - window // 4


@pytest.mark.parametrize("length,window", [(31, 30), (75, 30), (200, 30), (2900, 1022)])
def test_each_residue_reads_the_window_whose_centre_is_nearest(length, window):
  starts = windows.window_starts(length, window)
  which, offset = windows.residue_windows(length, window)
  assert which.shape[1] <= 3
  for i in range(length):
    holding = [w for w, s in enumerate(starts) if s <= i < s + window]
    copies = [w for w in which[i] if w >= 0]
    assert sorted(copies) == holding and copies[1:] == sorted(copies[1:])
    centre = lambda w: abs(i - (starts[w] + (window - 1) / 2))
    assert centre(copies[0]) == min(centre(w) for w in holding)
    assert [offset[i, j] for j in range(len(copies))] == [i - starts[w] for w in copies]
    assert np.all(offset[i, len(copies):] == -1)


def _letters(batch, node_to_token):
  vocab = np.array(rc.ESM_VOCAB)
  return vocab[batch.tokens[node_to_token[..., 0], node_to_token[..., 1]]]


@pytest.mark.parametrize("packed", [False, True])
def test_windowed_batch_reads_and_holds_every_residue(packed):
  long = testing.random_example(95, seed=3, n_chains=2)  # chains of 48 and 47
  short = testing.random_example(20, seed=4)
  examples = [long, short]
  budget = layout.budget_for(examples, window=30, packed_rows=packed)
  assert budget.token_copies == 2 and budget.row_length == 32 and budget.window == 30
  batch = layout.collate(examples, budget)
  assert batch.node_to_token.shape == (budget.n_node, 2, 2)
  assert batch.budget == budget
  res = np.flatnonzero(batch.node_mask & (batch.graph.nodes["node_kind"] == 0))
  letters = np.concatenate([np.array(list("".join(ex.sequences[c][i] for c, i in zip(
      ex.chain_row, ex.residue_index)))) for ex in examples])
  n2t = batch.node_to_token[res]
  assert np.array_equal(_letters(batch, n2t[:, 0]), letters)
  copy = n2t[:, 1, 0] >= 0
  assert np.array_equal(_letters(batch, n2t[copy, 1]), letters[copy])
  # 48 residues in windows of 30: starts 0 and 18; residues 18..29 are in both.
  first_chain = np.flatnonzero(long.chain_row == 0)
  assert copy[first_chain].sum() == 12
  assert not copy[len(long.aatype):].any()  # the short protein fits one window
  # Every window is one <cls> ... <eos> run; the short chain's run is whole.
  assert (batch.tokens == rc.ESM_CLS).sum() == 5
  # Chain ids still count chains (not windows): 0, 1 for the long protein, 2 the short.
  assert sorted(set(batch.graph.nodes["chain_id"][res].tolist())) == [0, 1, 2]


def test_an_unwindowed_budget_refuses_a_chain_longer_than_its_rows():
  ex = testing.random_example(50, seed=5)
  budget = dataclasses.replace(layout.budget_for([ex]), row_length=32)
  with pytest.raises(ValueError, match="ESM row length"):
    layout.collate([ex], budget)
  assert layout.budget_for([ex], window=60).token_copies == 1  # nothing to window


def test_windowed_budget_holds_each_example_alone_and_batches_in_order():
  examples = [testing.random_example(n, seed=n) for n in (40, 90, 61, 25, 33)]
  alone = layout.windowed_budget(examples, 30)
  assert alone.n_graph == 2 and alone.row_length == 32
  assert alone.token_copies == 2 and alone.n_row == 4  # 90 residues: 4 windows
  for ex in examples:
    assert layout.collate([ex], alone).budget == alone
  three = layout.windowed_budget(examples, 30, batch_size=3)
  assert three.n_graph == 4 and three.n_node >= 3 * 249 / 5
  groups = layout.windowed_batches(examples, three)
  assert sum(groups, []) == list(range(5)) and max(map(len, groups)) > 1
  for group in groups:
    assert layout.collate([examples[i] for i in group], three).budget == three


def test_token_copies_counts_every_long_chain():
  """Copies are not monotonic in the length: 56 residues in windows of 30 put a
  residue in three windows, 110 only in two; a budget holds both."""
  k = {n: windows.residue_windows(n, 30)[0].shape[1] for n in (56, 110)}
  assert k == {56: 3, 110: 2}
  examples = [testing.random_example(110, seed=1), testing.random_example(56, seed=2)]
  assert layout.token_copies(examples, 30) == 3
  layout.collate(examples, layout.budget_for(examples, window=30))


def test_window_for_fills_whole_row_multiples():
  """Rows of window + 2 tokens: max_residues + 2 rounded up to the row multiple (the
  Pallas block), never past ESM-2's 1,024 positions."""
  assert windows.window_for(1022, 1) == 1022
  assert windows.window_for(1022, 128) == 1022
  assert windows.window_for(500, 128) == 510
  assert windows.window_for(64, 128) == 126  # the tiny configs with splash / flash_gpu
  assert windows.window_for(500, 8) == 502
  assert windows.window_for(1000, 384) == 1022
  with pytest.raises(ValueError, match="max_residues=1 "):
    windows.window_for(1, 1)


def test_eval_long_chains_is_checked_with_a_hint():
  from bihier_jax import config_check  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  assert config.data.eval_long_chains == "whole"
  config_check.check_values(config)
  config.data.eval_long_chains = "first_windw"
  with pytest.raises(config_check.ConfigError, match="did you mean 'first_window'"):
    config_check.check_values(config)


def test_eval_results_name_the_long_chain_protocol(tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  from bihier_jax.training import evaluation  # pylint: disable=g-import-not-at-top
  results = {"val": {"accuracy": 0.5, "num_windowed_proteins": 3.0}}
  evaluation.write_eval_results(str(tmp_path), results, step=4, checkpoint="best",
                                long_chains="whole")
  saved = json.load(open(tmp_path / "eval" / "val.json"))
  assert saved["eval_long_chains"] == "whole" and saved["num_windowed_proteins"] == 3
  assert "Long chains: whole" in (tmp_path / "eval" / "metrics.md").read_text()
