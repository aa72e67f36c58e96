"""Multi-process editing (``--trainer.strategy ddp``, gloo on CPU): two processes give the single process's edits.

Each run is ``python main.py fit`` in a subprocess (Lightning's DDP launcher starts the second process by rerunning the
command), one thread per process, on the saved tiny model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, tiny_fit_args, tiny_ft_args, wise_fit_args

pytestmark = pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs torch.distributed with gloo")

STREAM = ["--data.edits_per_step", "2", "--model.fluency", "false", "--trainer.logger", "false"]


def run(args: list[str], devices: int, cache: Path | None = None) -> subprocess.CompletedProcess:
    """``main.py <args>`` on ``devices`` CPU processes (DDP when more than one)."""
    launch = ["--trainer.accelerator", "cpu", "--trainer.devices", str(devices)]
    if devices > 1:
        launch += ["--trainer.strategy", "ddp", "--model.check_replicas", "true"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "main.py", *args, *launch], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    if devices > 1:  # Lightning's launcher did start the processes, joined by gloo
        assert f"Starting with {devices} processes" in done.stdout + done.stderr
    return done


def edited_state(root: Path) -> dict[str, torch.Tensor]:
    """Every float tensor of the checkpoint's module state (edited weights, method state: WISE's memories are nested
    in its extra state), by dotted key."""
    state = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")["state_dict"]
    flat: dict[str, torch.Tensor] = {}

    def visit(prefix: str, value: object) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                visit(f"{prefix}.{key}", item)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                visit(f"{prefix}.{i}", item)
        elif torch.is_tensor(value) and value.is_floating_point():
            flat[prefix] = value

    for key, value in state.items():
        if key.startswith(("model.", "method.")):
            visit(key, value)
    return flat


def metrics(root: Path) -> dict[str, float]:
    return json.loads((root / "summary.json").read_text())["metrics"]


def assert_same_run(single: Path, ddp: Path) -> None:
    one, two = edited_state(single), edited_state(ddp)
    assert one.keys() == two.keys() and one
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=key)
    a, b = metrics(single), metrics(ddp)
    assert a.keys() == b.keys() and {"efficacy", "generalization", "locality", "scored_edits"} <= set(a)
    for key in a:
        assert b[key] == pytest.approx(a[key], abs=1e-6), key


@pytest.mark.parametrize("config", ["lyaplock", "alphaedit"])
def test_two_processes_edit_as_one(tiny_run: dict[str, Path], tmp_path: Path, config: str) -> None:
    # 3 requests, 2 per step: the first step splits 1 + 1, the second leaves one rank without a request
    for devices in (1, 2):
        run(tiny_fit_args(tiny_run, config, tmp_path / f"p{devices}", *STREAM), devices)
    assert_same_run(tmp_path / "p1", tmp_path / "p2")
    assert json.loads((tmp_path / "p2" / "summary.json").read_text())["protocol"]["total_edits"] == 3


def test_two_processes_fine_tune_and_wise_as_one(tiny_run: dict[str, Path], tmp_path: Path) -> None:
    for name, make in (("ft", tiny_ft_args), ("wise", wise_fit_args)):
        for devices in (1, 2):
            run(make(tiny_run, tmp_path / f"{name}{devices}", *STREAM), devices)
        assert_same_run(tmp_path / f"{name}1", tmp_path / f"{name}2")


def test_ddp_run_resumes_from_its_checkpoint(tiny_run: dict[str, Path], tmp_path: Path) -> None:
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run(tiny_fit_args(tiny_run, "memit", whole, *STREAM), 2)
    run(tiny_fit_args(tiny_run, "memit", cut, *STREAM, "--trainer.max_steps", "1"), 2)
    ckpt = cut / "checkpoints" / "last.ckpt"
    run(tiny_fit_args(tiny_run, "memit", cut, *STREAM, "--ckpt_path", str(ckpt)), 2)
    assert_same_run(whole, cut)


def test_cold_cache_is_built_once_by_two_processes(tiny_run: dict[str, Path], tmp_path: Path) -> None:
    # the model-sampled corpus is behind the machine lock, C0 collected by both ranks together and written by one
    args = tiny_fit_args(tiny_run, "memit", tmp_path / "run", *STREAM, "--model.method.init_args.stats_corpus", "model")
    done = run(args, 2)
    log = done.stdout + done.stderr
    assert log.count("Sampling a 300-token corpus") == 1, log[-3000:]
    assert log.count("Collecting C0 for 2 layer(s)") == 2  # every rank joins the collection ...
    assert len(list((tiny_run["cache"] / "stats").glob("*.safetensors"))) == 2  # ... and one set of files is left
    assert not list((tiny_run["cache"] / "stats").glob(".*.tmp"))
