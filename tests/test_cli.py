"""The command line end to end on a tiny local model: outputs, checkpoints, resume and bad input (the shipped configs:
tests/test_configs.py)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import REPO, tiny_fit_args

from callbacks import EditProgressBar
from main import cli_main


def _args(run: dict[str, Path], method: str = "lyaplock", root: Path | None = None, *extra: str) -> list[str]:
    return tiny_fit_args(run, method, root or run["root"], *extra)


def _edited(checkpoint: Path) -> dict[str, torch.Tensor]:
    state = torch.load(checkpoint, weights_only=True, map_location="cpu")["state_dict"]
    return {k: v for k, v in state.items() if k.startswith(("model.", "method.", "edits_done"))}


@pytest.mark.parametrize("method", ["lyaplock", "memit", "alphaedit"])
def test_fit_writes_summary_metrics_and_small_checkpoint(tiny_run: dict[str, Path], method: str) -> None:
    cli_main(_args(tiny_run, method))
    root = tiny_run["root"]
    summary = json.loads((root / "summary.json").read_text())
    assert summary["method"] == {"lyaplock": "LyapLock", "memit": "MEMIT", "alphaedit": "AlphaEdit"}[method]
    assert summary["protocol"]["total_edits"] == 3 and summary["protocol"]["edits_per_step"] == 1
    assert summary["protocol"]["metric_family"] == "counterfact" and summary["protocol"]["token_averaging"] == "case"
    assert set(summary["metrics"]) >= {"efficacy", "generalization", "locality"}
    assert set(summary["timing"]["split"]) == {"targets", "keys", "solve"}
    rows = list(csv.DictReader(next(root.glob("csv/version_*/metrics.csv")).open()))
    hparams = yaml.safe_load(next(root.glob("csv/version_*/hparams.yaml")).read_text())  # plain data, no Python tags
    assert hparams["data"]["edits_per_step"] == 1 and hparams["config"] == [str(REPO / "configs" / f"{method}.yaml")]
    assert {"val/efficacy", "edits/total", "time/targets"} <= set(rows[0])
    assert (root / "wandb").is_dir()
    assert [p.name for p in (root / "checkpoints").iterdir()] == ["last.ckpt"]  # one file, not one per step
    state = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")["state_dict"]
    model_keys = [k for k in state if k.startswith("model.")]
    assert sorted(model_keys) == [f"model.model.layers.{i}.mlp.down_proj.weight" for i in (1, 2)]


def test_fit_runs_with_the_edit_progress_bar(tiny_run: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    cli = cli_main(_args(tiny_run, "memit", None, "--trainer.enable_progress_bar", "true"))
    (bar,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, EditProgressBar)]
    assert cli.trainer.progress_bar_callback is bar
    assert "edits=3/3" in capsys.readouterr().out  # the finished bar stays on screen (Lightning writes to stdout)
    assert json.loads((tiny_run["root"] / "summary.json").read_text())["protocol"]["total_edits"] == 3
    (table,) = tiny_run["root"].glob("wandb/offline-run-*/files/media/table/val/samples_*.table.json")  # EvalSamples
    assert json.loads(table.read_text())["columns"] == ["case_id", "prompt", "target", "prediction", "hit"]


def test_checkpoint_every_n_steps_overwrites_one_file(tiny_run: dict[str, Path]) -> None:
    root = tiny_run["root"]
    cli_main(_args(tiny_run, "memit", root, "--checkpoint.every_n_train_steps", "2"))  # 3 steps: saved after step 2
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    cli_main(_args(tiny_run, "memit", root))  # a second run in the same directory replaces it
    assert [p.name for p in (root / "checkpoints").iterdir()] == ["last.ckpt"]
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3


def test_resume_mid_stream_matches_uninterrupted_run(tiny_run: dict[str, Path], tmp_path: Path) -> None:
    keep_every_step = [
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        f"--trainer.callbacks.dirpath={tmp_path / 'full' / 'checkpoints'}",
        "--trainer.callbacks.every_n_train_steps=1",
        "--trainer.callbacks.save_top_k=-1",
        "--trainer.callbacks.filename={step}",
    ]
    cli_main(_args(tiny_run, "lyaplock", tmp_path / "full", *keep_every_step))
    after_first = tmp_path / "full" / "checkpoints" / "step=1.ckpt"  # as if the run had been killed after step 1
    assert torch.load(after_first, weights_only=True)["global_step"] == 1
    cli_main(_args(tiny_run, "lyaplock", tmp_path / "resumed", "--ckpt_path", str(after_first)))
    full = _edited(tmp_path / "full" / "checkpoints" / "step=3.ckpt")
    resumed = _edited(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert full.keys() == resumed.keys()
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], msg=key)
    assert int(resumed["edits_done"]) == 3
    summary = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert summary["protocol"]["edit_steps"] == 3


def test_a_stream_stopped_short_continues_with_every_evaluation(tiny_run: dict[str, Path], tmp_path: Path) -> None:
    """A long stream run in sittings (``max_steps`` short of the stream, then ``--ckpt_path``) keeps the evaluation
    made at the checkpoint's step in its history, and ends where the uninterrupted run ends."""
    every_step = ["--trainer.val_check_interval", "1", "--checkpoint.every_n_train_steps", "1"]
    cli_main(_args(tiny_run, "lyaplock", tmp_path / "full", *every_step))
    sittings = tmp_path / "sittings"
    cli_main(_args(tiny_run, "lyaplock", sittings, *every_step, "--trainer.max_steps", "2"))
    checkpoint = str(sittings / "checkpoints" / "last.ckpt")
    cli_main(_args(tiny_run, "lyaplock", sittings, *every_step, "--ckpt_path", checkpoint))
    full, resumed = (json.loads((root / "summary.json").read_text()) for root in (tmp_path / "full", sittings))
    assert [h["edits"] for h in resumed["history"]] == [h["edits"] for h in full["history"]] == [1, 2, 3]
    for ours, theirs in zip(resumed["history"], full["history"], strict=True):
        assert ours["metrics"] == pytest.approx(theirs["metrics"]), ours["edits"]


def test_run_settings_win_over_the_checkpoints_and_are_named(tiny_run: dict[str, Path]) -> None:
    cli_main(_args(tiny_run, "memit"))
    checkpoint = tiny_run["root"] / "checkpoints" / "last.ckpt"
    args = _args(tiny_run, "memit", None, "--ckpt_path", str(checkpoint), "--model.token_averaging", "pooled")
    with pytest.warns(UserWarning, match=r"model.token_averaging: 'pooled' in this run, 'case' in the checkpoint"):
        cli = cli_main(["validate", *args[1:]])
    assert cli.model.token_averaging == "pooled"  # Lightning's own rule would have put the checkpoint's back


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"target_new": ""}, r"record 0 .*'target_new' is empty"),
        ({"prompt": "The home of Ann is", "subject": "Zed"}, r"record 0 .*subject .Zed. does not occur"),
    ],
)
def test_bad_request_fails_before_anything_is_written(
    tiny_run: dict[str, Path], tiny_run_requests: list[dict], record: dict, message: str
) -> None:
    tiny_run["data"].write_text(json.dumps({**tiny_run_requests[0], **record}))
    with pytest.raises(ValueError, match=message):
        cli_main(_args(tiny_run))
    assert not tiny_run["root"].exists()
    assert not tiny_run["cache"].exists()


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        (
            ["--model.method.init_args.target_steps", "0"],
            'Parser key "target_steps":\n      Not of type PositiveInt: 0 does not conform to restriction v>0',
        ),
        (["--data.edits_per_step", "0"], 'Parser key "data.edits_per_step":\n  Not of type PositiveInt: 0 does not'),
        (["--model.token_averaging", "mean"], "Expected a typing.Literal['case', 'pooled']. Got value: mean"),
    ],
)
def test_bad_argument_fails_while_parsing_and_names_it(
    tiny_run: dict[str, Path], capsys: pytest.CaptureFixture, override: list[str], reason: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(_args(tiny_run, "lyaplock", None, *override))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and reason in err
    assert "usage:" not in err and "--help lists the accepted arguments" in err  # the error, not the whole usage
    assert not tiny_run["root"].exists()


def test_help_shows_the_restricted_types(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(REPO / "configs" / "lyaplock.yaml"), "--model.method.help", "LyapLock"])
    help_text = " ".join(capsys.readouterr().out.split())  # the same words, whatever the terminal width
    assert "(type: PositiveFloat, default: 60.0)" in help_text  # budget
    assert "(type: ClosedUnitInterval, default: 0.95)" in help_text  # stop_prob


def test_missing_model_path_is_named(tiny_run: dict[str, Path]) -> None:
    args = _args(tiny_run)
    args[args.index("--model.model_name") + 1] = str(tiny_run["model"] / "missing")
    with pytest.raises(ValueError, match="model.model_name: path .* does not exist"):
        cli_main(args)
    assert not tiny_run["root"].exists()


def test_bad_request_file_is_one_line_from_the_command(tmp_path):
    """The stream is read while jsonargparse links it into the module; its error still reaches the user as one line
    naming the record and field, and nothing is written."""
    import subprocess
    import sys

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"case_id": "x1", "prompt": "The capital of {} is", "subject": "France", "target_new": " "}\n')
    run = tmp_path / "run"
    cmd = [sys.executable, "main.py", "fit", "--config", "configs/memit.yaml", "--data.path", str(bad)]
    out = subprocess.run([*cmd, "--trainer.default_root_dir", str(run)], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        "error: bad.jsonl: record 0 (line 1, case_id x1): field 'target_new' is empty"
    )
    assert not run.exists()


def test_a_stream_not_a_multiple_of_the_interval_is_still_evaluated_at_its_end(tiny_run: dict[str, Path]) -> None:
    cli_main(_args(tiny_run, "memit", None, "--trainer.val_check_interval", "2"))  # 3 edit steps
    history = json.loads((tiny_run["root"] / "summary.json").read_text())["history"]
    assert [h["edits"] for h in history] == [2, 3]
