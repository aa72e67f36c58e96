"""``benchmarks/long_stream.py`` turns a run's ``summary.json`` into the rows of its milestone table.

A stream run in sittings evaluates a sample of the edits every interval and all edits so far at the end of each
sitting; the table must show the evaluation at (or last before) each milestone once, every all-edit evaluation, and
the final one, each with the general-ability scores measured at or before it.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from long_stream import at_milestones  # noqa: E402


def _summary(evaluations: list[tuple[int, int]], total_edits: int) -> dict:
    """A run's summary with one evaluation per ``(edits, scored_edits)`` and a general-ability point at each."""
    history = [
        {"edits": edits, "metrics": {"efficacy": 1.0 - edits / 20_000, "scored_edits": scored}}
        for edits, scored in evaluations
    ]
    general = [{"edits": 0, "scores": {"sst2": 0.70}}] + [
        {"edits": edits, "scores": {"sst2": 0.70 - edits / 100_000}} for edits, _ in evaluations
    ]
    return {"protocol": {"total_edits": total_edits}, "history": history, "curves": {"GeneralAbility": general}}


def test_a_run_in_sittings_lists_each_milestone_and_each_sitting_end_once() -> None:
    # sampled every 1,000 edits; the first sitting stopped at 3,000 (all scored), the run now stands at 6,000
    evaluations = [(1000, 500), (2000, 500), (3000, 3000), (4000, 500), (5000, 500), (6000, 500)]
    rows = at_milestones(_summary(evaluations, total_edits=9952))
    assert sorted(rows) == [1000, 2000, 3000, 5000, 6000]  # 10,000: last evaluation before it is 6,000, listed once
    assert rows[3000]["scored_edits"] == 3000
    assert rows[5000]["efficacy"] == 1.0 - 5000 / 20_000
    assert rows[6000]["general/sst2"] == 0.70 - 6000 / 100_000


def test_the_final_evaluation_of_a_finished_stream_is_a_row() -> None:
    evaluations = [(1000, 500), (2000, 500), (2500, 2500)]
    rows = at_milestones(_summary(evaluations, total_edits=2500))
    assert sorted(rows) == [1000, 2000, 2500]
    assert rows[2500]["edits"] == 2500 and rows[2500]["general/sst2"] == 0.70 - 2500 / 100_000


def test_a_run_without_evaluations_has_no_rows() -> None:
    assert at_milestones({"protocol": {"total_edits": 3000}, "history": []}) == {}
