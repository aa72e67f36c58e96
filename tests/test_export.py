"""``python main.py export``: a run's edited model as a Hugging Face directory that plain transformers loads (WISE:
refused by plain ``from_pretrained``, reloaded by ``load_edited``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, plain_load, tiny_fit_args, tiny_ft_args, wise_fit_args

from callbacks import PruneRestraint
from editing.wise_export import load_edited
from main import cli_main

TEXTS = ["The home of Ann is Rome", "Bob lives in", "The sky is"]


@torch.no_grad()
def _logits(module, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    batch = module.tokenizer(texts, return_tensors="pt", padding=True)
    return batch["input_ids"], module.model(**batch).logits


def _check_plain_load(directory: Path, tmp_path: Path, expected: torch.Tensor, ids: torch.Tensor) -> None:
    assert (directory / "model.safetensors").is_file() and (directory / "config.json").is_file()
    result = plain_load(directory, TEXTS, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    plain = torch.load(tmp_path / "plain.pt", weights_only=True)
    assert torch.equal(plain["ids"], ids)
    torch.testing.assert_close(plain["logits"], expected, rtol=0, atol=1e-6)
    assert torch.equal(plain["logits"].argmax(-1), expected.argmax(-1))  # the same predictions, token by token


@pytest.mark.parametrize("method", ["lyaplock", "memit", "alphaedit", "ft"])
def test_export_loads_in_plain_transformers_and_predicts_as_the_edited_model(tiny_run, tmp_path, method, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tiny_run["root"]
    args = tiny_ft_args(tiny_run, root) if method == "ft" else tiny_fit_args(tiny_run, method, root)
    if method == "alphaedit":  # the tiny model's C0 has no eigenvalue below 2e-2: a null space that holds edits
        args += ["--model.method.init_args.nullspace_threshold", "1e6"]
    run = cli_main([*args, "--trainer.max_steps", "2"]).model
    ids, expected = _logits(run, TEXTS)
    export = tmp_path / "export"
    cli_main(["export", "--ckpt_path", str(root / "checkpoints" / "last.ckpt"), "--export_dir", str(export)])
    _check_plain_load(export, tmp_path, expected, ids)
    assert plain_load(tiny_run["model"], TEXTS, tmp_path).returncode == 0
    unedited = torch.load(tmp_path / "plain.pt", weights_only=True)["logits"]
    assert not torch.allclose(unedited, expected)  # the export holds the edits, not the model it started from
    assert not (tmp_path / "runs").exists()  # export writes nothing but its directory


def test_export_with_prune_writes_the_restrained_weights(tiny_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tiny_run["root"]
    small_lambda = ["--model.method.init_args.mom2_weight", "1e-4", "--model.method.init_args.target_lr", "2.0"]
    cli = cli_main(tiny_fit_args(tiny_run, "memit_prune", root, *small_lambda))
    run = cli.model
    prune = next(cb for cb in cli.trainer.callbacks if isinstance(cb, PruneRestraint))
    restrained = prune.restrained_weights(run)  # W + U F(S) V^T (tests/callbacks/test_prune.py checks the formula)
    name = "model.layers.2.mlp.down_proj"
    assert prune.restrained[name] >= 1 and not torch.equal(restrained[name], run.model.get_submodule(name).weight)
    checkpoint = str(root / "checkpoints" / "last.ckpt")
    with pytest.warns(UserWarning, match=r"holds PruneRestraint\{.*\} state but the config has no such callback"):
        cli_main(["export", "--ckpt_path", checkpoint, "--export_dir", str(tmp_path / "unrestrained")])
    config = str(REPO / "configs" / "memit_prune.yaml")
    cli_main(["export", "--config", config, "--ckpt_path", checkpoint, "--export_dir", str(tmp_path / "export")])

    params = {n: w.parameter for n, w in run.method.edited_weights().items()}
    unrestrained = {n: p.detach().clone() for n, p in params.items()}
    for n, value in restrained.items():  # the expected model: the run's, with the restrained weights
        params[n].copy_(value)
    ids, expected = _logits(run, TEXTS)
    _check_plain_load(tmp_path / "export", tmp_path, expected, ids)
    for n, value in unrestrained.items():
        params[n].copy_(value)
    ids, expected = _logits(run, TEXTS)
    _check_plain_load(tmp_path / "unrestrained", tmp_path, expected, ids)


def test_wise_export_refuses_plain_loading_and_reloads_with_its_router(tiny_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tiny_run["root"]
    run = cli_main(wise_fit_args(tiny_run, root)).model
    export = tmp_path / "export"
    cli_main(["export", "--ckpt_path", str(root / "checkpoints" / "last.ckpt"), "--export_dir", str(export)])
    result = plain_load(export, TEXTS, tmp_path)
    assert result.returncode != 0 and "editing.wise_export.load_edited" in result.stderr
    concrete = f"from transformers import LlamaForCausalLM; LlamaForCausalLM.from_pretrained({str(export)!r})"
    refused = subprocess.run(  # a concrete class does not silently load the unedited weights either
        [sys.executable, "-c", concrete],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert refused.returncode != 0
    model, tokenizer, router = load_edited(export)
    tokenizer.padding_side = "right"
    texts = ["The home of Ann is", "The sky is"]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    ids, expected = _logits(run, texts)
    with torch.no_grad():
        got = model(**batch).logits
    assert torch.equal(batch["input_ids"], ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert router.last_route.tolist() == run.method.router.last_route.tolist()
