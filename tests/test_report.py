"""``python -m editing.report`` renders runs into report.md with one PNG per metric, and refuses what it cannot compare.

The run directories are written here by hand in the layout of a real run: ``summary.json`` as
:class:`callbacks.RunReport` writes it and a ``csv/version_0/metrics.csv`` as the CSV logger does (one row per edit
step with its training values, one per evaluation with the ``val/*`` values).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

from editing.report import Run, load_run, main, panels, write_report

pytest.importorskip("matplotlib")  # the `test` extra installs it; the plots cannot be checked without it


def _fake_run(root: Path, name: str, method: str, stream_id: str, efficacy: list[float], csv_log: bool = True) -> Path:
    """A finished 2-step run (2 edits per step) evaluated after each step, with LyapLock and spectral curves."""
    run = root / name
    run.mkdir(parents=True)
    history = [
        {"edits": 2 * (i + 1), "metrics": {"efficacy": e, "locality": 1.0 - 0.1 * i, "perplexity": 20.0 + i}}
        for i, e in enumerate(efficacy)
    ]
    summary = {
        "method": method,
        "model": "tiny",
        "protocol": {
            "data": "edits.jsonl",
            "stream_id": stream_id,
            "edits_per_step": 2,
            "total_edits": 4,
            "edit_steps": 2,
            "metric_family": "counterfact",
            "evaluation": "every 1 steps and at the end",
        },
        "metrics": history[-1]["metrics"],
        "spectral": {"layer_01/kappa": 5.0},
        "routing": {},
        "history": history,
        "steps": [{"targets": 0.1, "lyaplock/layer_01/queue": 1.0 + i} for i in range(2)],
        "timing": {"seconds_per_step": 0.5, "split": {}, "evaluation_seconds": 0.1, "peak_rss_mb": 1.0},
    }
    (run / "summary.json").write_text(json.dumps(summary))
    if csv_log:
        columns = ["edits/total", "epoch", "step", "time/targets", "spectral/layer_01/kappa", "lyaplock/layer_01/queue"]
        columns += ["general/arc", "val/efficacy", "val/locality", "val/perplexity"]
        rows = [{"edits/total": 0.0, "step": 0, "general/arc": 0.5}]  # GeneralAbility's baseline, before any edit
        for i, evaluation in enumerate(history):
            edits = float(evaluation["edits"])
            rows.append({"edits/total": edits, "step": i, "time/targets": 0.1, "spectral/layer_01/kappa": 4.0 + i,
                         "lyaplock/layer_01/queue": 1.0 + i})  # fmt: skip
            metrics = evaluation["metrics"]
            rows.append({"edits/total": edits, "step": i, "general/arc": 0.5 - 0.05 * i,
                         **{f"val/{k}": v for k, v in metrics.items()}})  # fmt: skip
        (run / "csv" / "version_0").mkdir(parents=True)
        with (run / "csv" / "version_0" / "metrics.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    return run


def test_two_runs_on_one_stream_side_by_side(tmp_path: Path) -> None:
    memit = _fake_run(tmp_path, "memit", "MEMIT", "s1", [0.5, 0.75])
    lyaplock = _fake_run(tmp_path, "lyaplock", "LyapLock", "s1", [0.9, 1.0])
    report = write_report([memit, lyaplock], tmp_path / "out")
    text = report.read_text()
    assert report == tmp_path / "out" / "report.md"
    header = "| run | efficacy | locality | general/arc | perplexity | seconds per edit step |"
    assert header in text
    assert "| memit | 0.750 | 0.900 | 0.450 | 21.000 | 0.500 |" in text
    assert "| lyaplock | 1.000 | 0.900 | 0.450 | 21.000 | 0.500 |" in text
    assert "| memit | MEMIT | tiny | edits.jsonl | s1 | 4 | 2 | counterfact |" in text
    for image in ("efficacy", "locality", "general", "perplexity", "kappa", "lyaplock_queue"):
        assert f"]({image}.png)" in text
        png = tmp_path / "out" / f"{image}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert text.index("### efficacy") < text.index("### locality") < text.index("### condition number kappa")


def test_curves_come_from_the_csv_and_else_from_the_summary(tmp_path: Path) -> None:
    logged = load_run(_fake_run(tmp_path, "logged", "MEMIT", "s1", [0.5, 0.75]))
    assert logged.curves["val/efficacy"] == {2.0: 0.5, 4.0: 0.75}
    assert logged.curves["general/arc"] == {0.0: 0.5, 2.0: 0.5, 4.0: 0.45}  # the baseline is the first point
    assert logged.curves["spectral/layer_01/kappa"] == {2.0: 4.0, 4.0: 5.0}
    assert "time/targets" not in logged.curves
    bare = load_run(_fake_run(tmp_path, "bare", "MEMIT", "s1", [0.5, 0.75], csv_log=False))
    assert bare.curves["val/efficacy"] == {2.0: 0.5, 4.0: 0.75}
    assert bare.curves["lyaplock/layer_01/queue"] == {2.0: 1.0, 4.0: 2.0}  # steps, placed at the edits done
    report = write_report([bare.path])
    assert report == bare.path / "report" / "report.md" and (bare.path / "report" / "efficacy.png").is_file()


def test_runs_on_different_streams_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a = _fake_run(tmp_path, "a", "MEMIT", "s1", [0.5])
    b = _fake_run(tmp_path, "b", "MEMIT", "s2", [0.6])
    with pytest.raises(SystemExit) as exit_info:
        main([str(a), str(b), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"{a} (stream s1) and {b} (stream s2)" in err and "--allow-mixed-streams" in err
    assert not (tmp_path / "out").exists()
    main([str(a), str(b), "--out", str(tmp_path / "out"), "--allow-mixed-streams"])
    assert "different edit streams (s1, s2)" in (tmp_path / "out" / "report.md").read_text()


def test_missing_summary_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "unfinished").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "unfinished")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'unfinished'}: no summary.json")
    assert err.count("\n") == 1


def test_missing_matplotlib_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = _fake_run(tmp_path, "run", "MEMIT", "s1", [0.5])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[bench\]"'):
        write_report([run])


def test_a_metric_per_group_is_one_panel_with_a_line_per_group(tmp_path: Path) -> None:
    by_age = {f"val/efficacy_by_age/fifth_{g}": {100.0: g / 4} for g in (1, 2)}
    curves = {"val/efficacy": {100.0: 0.9}, **by_age}
    grouped = panels([Run(tmp_path, {}, curves)])
    assert list(grouped) == ["efficacy", "efficacy_by_age"]
    assert [(s.label, s.y) for s in grouped["efficacy_by_age"]] == [("fifth_1", [0.25]), ("fifth_2", [0.5])]
