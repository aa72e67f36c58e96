"""What reaches Weights & Biases beside the metrics: the evaluation samples as a table and the run summary."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from callbacks import EvalSamples, RunReport
from callbacks.eval_samples import COLUMNS
from editing.metrics import score_targets


@pytest.fixture
def wandb_logger(tmp_path: Path):
    """A WandbLogger whose run is a mock (as tests/test_module.py): nothing is written or sent."""
    logger = WandbLogger(offline=True, save_dir=str(tmp_path))
    experiment = mock.MagicMock()
    experiment.summary = {}
    with mock.patch.object(WandbLogger, "experiment", new_callable=mock.PropertyMock, return_value=experiment):
        yield logger


def _module(model, tokenizer, requests, family: str, done: int) -> SimpleNamespace:
    stream = SimpleNamespace(requests=tuple(requests), metric_family=family, scored="edited")
    return SimpleNamespace(
        stream=stream, edits_done=done, model=model, tokenizer=tokenizer, _in_sample=lambda i: i != 0
    )  # the evaluation's sample leaves out the first edit


@pytest.mark.parametrize("family", ["counterfact", "token"])
def test_eval_samples_log_a_table_of_the_scored_rewrite_prompts(
    tiny_llama, char_tokenizer, tiny_requests, wandb_logger, tmp_path: Path, family: str
) -> None:
    module = _module(tiny_llama, char_tokenizer, tiny_requests, family, done=3)
    trainer = SimpleNamespace(
        sanity_checking=False, is_global_zero=True, global_step=3, loggers=[CSVLogger(tmp_path), wandb_logger]
    )
    samples = EvalSamples(count=1)
    with mock.patch.object(WandbLogger, "log_table") as log_table:
        samples.on_validation_batch_end(trainer, module, None, [], 0)
        samples.on_validation_epoch_end(trainer, module)
    ((_, kwargs),) = log_table.call_args_list
    assert kwargs["key"] == "val/samples" and kwargs["step"] == 3
    assert kwargs["columns"] == COLUMNS == ["case_id", "prompt", "target", "prediction", "hit"]
    request = tiny_requests[1]  # the first edit the sample scores
    new = score_targets(tiny_llama, char_tokenizer, [request.text], [request.target_new])
    if family == "counterfact":
        true = score_targets(tiny_llama, char_tokenizer, [request.text], [request.target_true])
        hit = bool(new.nll[0] < true.nll[0])
    else:
        hit = round(float(new.correct[0].float().mean()), 4)
    prediction = char_tokenizer.decode(new.predictions[0].tolist())
    assert len(new.predictions[0]) == len(" piano")  # one top-1 token per target token (bytes here, space included)
    assert kwargs["data"] == [["1", "Miles Davis plays the", "piano", prediction, hit]]


def test_eval_samples_do_nothing_without_wandb(tiny_llama, char_tokenizer, tiny_requests, tmp_path: Path) -> None:
    module = _module(tiny_llama, char_tokenizer, tiny_requests, "counterfact", done=3)
    trainer = SimpleNamespace(sanity_checking=False, is_global_zero=True, global_step=3, loggers=[CSVLogger(tmp_path)])
    samples = EvalSamples()
    with mock.patch.object(EvalSamples, "rows") as rows:
        samples.on_validation_batch_end(trainer, module, None, [], 0)
        samples.on_validation_epoch_end(trainer, module)
    rows.assert_not_called()
    with pytest.raises(ValueError, match="count must be at least 1"):
        EvalSamples(count=0)


def test_the_report_fills_the_wandb_run_summary(wandb_logger, tmp_path: Path) -> None:
    report = RunReport()
    report.evaluations = [{"edits": 3, "metrics": {"efficacy": 1.0, "locality": 0.75}, "seconds": 0.5}]
    report.step_times = [{"targets": 1.0, "solve": 2.0}]
    stream = SimpleNamespace(source="edits.jsonl", stream_id="abc", edits_per_step=1, metric_family="counterfact")
    module = SimpleNamespace(
        stream=stream, edits_done=3, model_name="tiny", token_averaging="case",
        method=type("MEMIT", (), {"timings": {"targets": 0.0, "solve": 0.0}})(),
    )  # fmt: skip
    trainer = SimpleNamespace(
        is_global_zero=True, default_root_dir=str(tmp_path), val_check_interval=1.0, callback_metrics={},
        callbacks=[], loggers=[CSVLogger(tmp_path), wandb_logger],
    )  # fmt: skip
    report.write(trainer, module)
    assert wandb_logger.experiment.summary == {
        "method": "MEMIT",
        "model": "tiny",
        "protocol/data": "edits.jsonl",
        "protocol/stream_id": "abc",
        "protocol/edits_per_step": 1,
        "protocol/total_edits": 3,
        "protocol/edit_steps": 1,
        "protocol/metric_family": "counterfact",
        "protocol/token_averaging": "case",
        "protocol/evaluation": "after the last edit",
        "metrics/efficacy": 1.0,
        "metrics/locality": 0.75,
        "timing/seconds_per_step": 3.0,
    }
    assert (tmp_path / "summary.json").is_file()
