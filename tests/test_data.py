"""EditDataModule: stream order, metric family, resumable loader, stream identity."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from editing.data import EditDataModule

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _module(**kwargs) -> EditDataModule:
    data = EditDataModule(**kwargs)
    data.setup("fit")
    return data


def test_builtin_stream_batches_in_file_order() -> None:
    data = _module(limit=7, edits_per_step=3)
    batches = list(data.train_dataloader())
    assert [len(b) for b in batches] == [3, 3, 1]
    assert [i for b in batches for i, _ in b] == list(range(7))
    assert data.metric_family == "counterfact"


def test_stream_is_one_immutable_description_read_once() -> None:
    data = EditDataModule(limit=4, edits_per_step=2)
    stream = data.stream()  # before setup: reads the requests
    data.setup("fit")
    assert data.stream() is stream
    assert [r.case_id for r in stream.requests] == [r.case_id for r in data.requests]
    assert (stream.metric_family, stream.source, stream.edits_per_step) == ("counterfact", "built-in", 2)
    assert stream.stream_id == data.stream_id == data.state_dict()["stream_id"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        stream.metric_family = "token"


def test_shuffle_is_seeded() -> None:
    order = [r.case_id for r in _module(limit=20, shuffle=True, seed=3).requests]
    assert order == [r.case_id for r in _module(limit=20, shuffle=True, seed=3).requests]
    assert order != [r.case_id for r in _module(limit=20).requests]
    assert order != [r.case_id for r in _module(limit=20, shuffle=True, seed=4).requests]


def test_stream_loader_resumes_after_consumed_batches() -> None:
    data = _module(limit=5, edits_per_step=2)
    loader = data.train_dataloader()
    first = next(iter(loader))
    state = loader.state_dict()
    assert state == {"batches_consumed": 1} and [i for i, _ in first] == [0, 1]
    resumed = data.train_dataloader()
    resumed.load_state_dict(state)
    assert [[i for i, _ in b] for b in resumed] == [[2, 3], [4]]
    assert [[i for i, _ in b] for b in resumed] == [[0, 1], [2, 3], [4]]  # the skip applies to one pass only


def test_resume_onto_another_stream_is_refused() -> None:
    state = _module(limit=5).state_dict()
    with pytest.raises(ValueError, match="another edit stream"):
        _module(limit=6).load_state_dict(state)


@pytest.mark.parametrize(("name", "family"), [("zsre_eval.json", "token"), ("counterfact.json", "counterfact")])
def test_metric_family_follows_the_data(name: str, family: str) -> None:
    if not (DATA / name).exists():
        pytest.skip(f"{DATA / name} not available")
    assert _module(path=str(DATA / name), limit=3).metric_family == family
