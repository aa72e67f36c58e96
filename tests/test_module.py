"""EditingModule's inputs (its scores: tests/test_metrics.py, tests/test_fluency.py; runs: tests/test_cli.py)."""

from __future__ import annotations

import csv
import json
from types import SimpleNamespace

import pytest
from helpers import tiny_ft_args
from jsonargparse.typing import PositiveInt
from lightning.pytorch.trainer.states import TrainerFn

from editing.data import EditDataModule
from editing.module import EditingModule
from editing.requests import EditRequest
from editing.rows import check_lengths
from main import cli_main


def test_the_stream_is_an_explicit_input():
    with pytest.raises(ValueError, match=r"^stream: EditingModule needs the edit stream"):
        EditingModule(method=SimpleNamespace()).stream
    stream = EditDataModule(limit=3).stream()
    module = EditingModule(method=SimpleNamespace(), stream=stream)
    assert module.stream is stream
    assert "stream" not in module.hparams and module.hparams["token_averaging"] == "case"


def test_hyperparameters_hold_builtin_numbers():
    """jsonargparse passes restricted types (``PositiveInt(5)``); checkpoints must load with ``weights_only=True``."""
    module = EditingModule(method=SimpleNamespace(), fluency_max_length=PositiveInt(5))
    assert type(module.hparams["fluency_max_length"]) is int and type(module.fluency_max_length) is int


# -- retention sample: periodic evaluations score a fixed, seeded sample; the last one every edit ---------------------
def test_periodic_evaluations_score_a_seeded_sample_and_the_last_every_edit(tiny_run, tiny_run_requests):
    records = [{**r, "case_id": f"{r['case_id']}-{k}"} for k in range(2) for r in tiny_run_requests]  # 6 edits
    tiny_run["data"].write_text("\n".join(json.dumps(r) for r in records))
    cli_main(tiny_ft_args(tiny_run, tiny_run["root"], "--model.eval_sample", "2"))
    rows = list(csv.DictReader(next(tiny_run["root"].glob("csv/version_*/metrics.csv")).open()))
    scored = [(float(r["edits/total"]), float(r["val/scored_edits"])) for r in rows if r.get("val/scored_edits")]
    assert scored == [(1, 1), (2, 2), (3, 2), (4, 2), (5, 2), (6, 6)]  # the stream's end: all of them


def test_sample_is_fixed_by_its_seed():
    stream = EditDataModule(limit=20).stream()
    places = []
    for seed in (0, 0, 1):
        module = EditingModule(method=SimpleNamespace(), stream=stream, eval_sample=5, eval_seed=seed)
        module.edits_done += 12
        module._trainer = SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.FITTING), max_steps=-1, global_step=12)
        cut = module._sample_cut()
        places.append([i for i in range(12) if int(module._ranks[i]) < cut])
    assert len(places[0]) == 5 and places[0] == places[1] and places[0] != places[2]


def test_a_sample_larger_than_the_stream_is_refused():
    with pytest.raises(ValueError, match=r"^eval_sample: 50 is larger than the stream \(3 edits\)"):
        EditingModule(method=SimpleNamespace(), stream=EditDataModule(limit=3).stream(), eval_sample=50)


# -- requests the model cannot take -----------------------------------------------------------------------------------
def test_a_request_longer_than_the_model_positions_is_refused_naming_it(char_tokenizer):
    config = SimpleNamespace(max_position_embeddings=64)
    fine = EditRequest(case_id="ok", prompt="The home of {} is", subject="Ann", target_new="Rome")
    check_lengths([fine], char_tokenizer, config, ["Hi there. {}"])
    long = EditRequest(case_id="big", prompt="The home of {} is", subject="x" * 200_000, target_new="Rome")
    with pytest.raises(ValueError, match=r"^request 1 \(case_id big\): field 'prompt \+ target_new' needs 20\d{4}"):
        check_lengths([fine, long], char_tokenizer, config)
    near = EditRequest(case_id="near", prompt="{} is", subject="y" * 50, target_new="Rome", rephrase_prompts=["z" * 60])
    with pytest.raises(ValueError, match=r"^request 0 \(case_id near\): field 'rephrase_prompts\[0\]' needs 65"):
        check_lengths([near], char_tokenizer, config)


def test_cli_refuses_a_giant_subject_before_editing(tiny_run, tiny_run_requests, capsys):
    giant = {**tiny_run_requests[0], "subject": "Ann" * 70_000}
    tiny_run["data"].write_text(json.dumps(giant))
    with pytest.raises(ValueError, match=r"^request 0 \(case_id t0\): field 'prompt \+ target_new' needs"):
        cli_main(tiny_ft_args(tiny_run, tiny_run["root"]))
    assert not list(tiny_run["root"].glob("checkpoints/*.ckpt"))
