"""Tests for callbacks.prune: PRUNE's restraint function, the restrained weights, the hooks and whole CLI runs."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import inflate_rank_one, tiny_fit_args
from lightning.pytorch.trainer.states import TrainerFn

from callbacks import ConditionNumberMonitor, PruneRestraint
from editing.methods import FineTune
from editing.spectral import randomized_svd, restrain, restraint_function, singular_triplets_above
from main import cli_main

LOG_BASES = ["e", 2.0, 1.5, 1.2, "linear"]


def _kappa(M: torch.Tensor) -> float:
    s = torch.linalg.svdvals(M.double())
    return float(s[0] / s[-1])


def _reference(W: torch.Tensor, Wn: torch.Tensor, log_base) -> torch.Tensor:
    """``W + U F(S) V^T`` from the full float64 SVD of ``Wn - W`` (independent of the truncated path)."""
    U, S, Vh = torch.linalg.svd(Wn.double() - W.double(), full_matrices=False)
    sigma = float(torch.linalg.svdvals(W.double())[0])
    return W.double() + U @ torch.diag(restraint_function(S, sigma, log_base)) @ Vh


def _inflated(m: int = 120, n: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``W`` (sigma_max about 2.7) and ``W_n = W + Delta``: three directions at 40, 20, 8 (above the threshold), two at
    2 and 1 (below) and a little full-rank noise."""
    gen = torch.Generator().manual_seed(seed)
    W = 0.1 * torch.randn(m, n, dtype=torch.float64, generator=gen)
    U = torch.linalg.qr(torch.randn(m, 5, dtype=torch.float64, generator=gen)).Q
    V = torch.linalg.qr(torch.randn(n, 5, dtype=torch.float64, generator=gen)).Q
    delta = U @ torch.diag(torch.tensor([40.0, 20.0, 8.0, 2.0, 1.0], dtype=torch.float64)) @ V.T
    return W, W + delta + 1e-3 * torch.randn(m, n, dtype=torch.float64, generator=gen)


# -- the restraint function -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("log_base", LOG_BASES)
def test_f_leaves_values_below_the_threshold_alone_and_is_continuous_at_it(log_base):
    sigma = 3.0
    s = torch.linspace(0.01, 30.0, 3001, dtype=torch.float64)
    f = restraint_function(s, sigma, log_base)
    below = s < sigma
    assert torch.equal(f[below], s[below])
    assert float(restraint_function(torch.tensor([sigma], dtype=torch.float64), sigma, log_base)[0]) == sigma
    e_or_base = math.e if log_base == "e" else log_base
    slope = 0.5 if log_base == "linear" else 1 / (sigma * math.log(e_or_base))  # F'(sigma+)
    for eps in (1e-4, 1e-7):
        just_above = float(restraint_function(torch.tensor([sigma + eps], dtype=torch.float64), sigma, log_base)[0])
        assert just_above - sigma == pytest.approx(slope * eps, rel=1e-3)
    assert (f[~below] >= sigma).all() and (f.diff() >= 0).all()  # monotone, never below the threshold
    x = torch.tensor([6.0, 30.0], dtype=torch.float64)
    expected = (
        (x + sigma) / 2
        if log_base == "linear"
        else sigma + torch.log(x / sigma) / math.log(math.e if log_base == "e" else log_base)
    )
    torch.testing.assert_close(restraint_function(x, sigma, log_base), expected)


@pytest.mark.parametrize("log_base", ["e", 2.0, 1.5, 1.2])
def test_f_shrinks_only_when_sigma_max_times_ln_base_is_at_least_one(log_base):
    s = torch.linspace(1.0, 50.0, 500, dtype=torch.float64)
    ln_base = math.log(math.e if log_base == "e" else log_base)
    large = 1.0 / ln_base  # F is a contraction above this threshold...
    assert (restraint_function(s * large, large, log_base) <= s * large + 1e-12).all()
    small = 0.5 / ln_base  # ...and raises values just above a smaller one (the paper's F is not scale-free)
    assert restraint_function(torch.tensor([1.1 * small], dtype=torch.float64), small, log_base)[0] > 1.1 * small


# -- the restrained weights -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("log_base", LOG_BASES)
def test_restraint_lowers_kappa_and_sigma_max_of_a_rank_one_inflation(log_base):
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(32, 64, dtype=torch.float64, generator=gen)
    u, v = (
        torch.randn(32, 1, dtype=torch.float64, generator=gen),
        torch.randn(64, 1, dtype=torch.float64, generator=gen),
    )
    Wn = W + 50.0 * u @ v.T / (u.norm() * v.norm()) * torch.linalg.svdvals(W)[0]
    sigma = float(torch.linalg.svdvals(W)[0])
    restrained, count = restrain(W, Wn, sigma, log_base)
    assert count == 1
    factor = 0.6 if log_base == "linear" else 0.2  # linear: 51 sigma -> about 26 sigma; log: 51 sigma -> a few sigma
    assert _kappa(restrained) < factor * _kappa(Wn)
    assert torch.linalg.svdvals(restrained)[0] < factor * torch.linalg.svdvals(Wn)[0]


@pytest.mark.parametrize("log_base", ["e", 1.2, "linear"])
def test_restrained_weight_is_w_plus_u_f_s_vt_and_truncated_matches_full(log_base):
    W, Wn = _inflated()
    sigma = float(torch.linalg.svdvals(W)[0])
    reference = _reference(W, Wn, log_base)
    full, n_full = restrain(W, Wn, sigma, log_base, full_svd=True)
    generator = torch.Generator().manual_seed(0)
    truncated, n_truncated = restrain(W, Wn, sigma, log_base, rank=1, generator=generator)  # rank grows 1 -> 2 -> 4
    assert n_full == n_truncated == 3
    torch.testing.assert_close(full, reference, rtol=0, atol=1e-10)
    torch.testing.assert_close(truncated, reference, rtol=0, atol=1e-10)
    # it replaces W_n: adding U F(S) V^T on top of W_n would be far off
    assert (full - (Wn + (reference - W))).abs().max() > 1.0


def test_truncated_svd_grows_until_it_reaches_below_the_threshold():
    W, Wn = _inflated()
    delta = Wn - W
    U, S, V = singular_triplets_above(delta, 5.0, rank=1, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(S, torch.linalg.svdvals(delta)[:3], rtol=1e-12, atol=0)
    torch.testing.assert_close(U.T @ delta @ V, torch.diag(S), rtol=0, atol=1e-9)
    _, S_top, _ = randomized_svd(delta, 2, generator=torch.Generator().manual_seed(0))
    assert S_top.shape == (2,)
    assert singular_triplets_above(delta, 100.0)[1].numel() == 0


def test_randomized_svd_leaves_the_global_random_state_alone():
    W, Wn = _inflated()
    state = torch.random.get_rng_state()
    restrain(W, Wn, 3.0, rank=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.random.get_rng_state(), state)


# -- the hooks, on a bound method ------------------------------------------------------------------------------------
def _bound_module(model, char_tokenizer, tmp_path) -> SimpleNamespace:
    method = FineTune(layer=1)
    method.setup(model, char_tokenizer, "tiny", tmp_path)
    return SimpleNamespace(method=method, edits_done=torch.tensor(0), model=model, tokenizer=char_tokenizer)


def _inflate(module: SimpleNamespace) -> tuple[str, torch.Tensor]:
    ((name, weight),) = module.method.edited_weights().items()
    W = weight.parameter
    inflate_rank_one(W)
    module.edits_done += 1
    return name, W


def _fitting(global_step: int) -> SimpleNamespace:
    """The parts of a fitting Trainer that PRUNE's validation hooks read."""
    return SimpleNamespace(
        sanity_checking=False, global_step=global_step, is_global_zero=True, state=SimpleNamespace(fn=TrainerFn.FITTING)
    )


def test_posthoc_swaps_restrained_weights_in_for_validation_and_out_after(tiny_model, char_tokenizer, tmp_path):
    module = _bound_module(tiny_model, char_tokenizer, tmp_path)
    trainer = _fitting(global_step=1)
    prune = PruneRestraint(export_dir=str(tmp_path / "export"))
    prune.on_fit_start(trainer, module)
    original = next(iter(prune.originals.values())).clone()
    name, W = _inflate(module)
    unrestrained = W.detach().clone()

    prune.on_validation_start(trainer, module)
    torch.testing.assert_close(W.double(), _reference(original, unrestrained, "e"), rtol=0, atol=1e-5)
    assert _kappa(W) < _kappa(unrestrained) and prune.restrained == {name: 1}
    # a checkpoint written mid-evaluation keeps the unrestrained weights and the originals
    checkpoint = {"state_dict": {f"model.{name}.weight": W.detach().clone()}, "callbacks": {}}
    prune.on_save_checkpoint(trainer, module, checkpoint)
    assert torch.equal(checkpoint["state_dict"][f"model.{name}.weight"], unrestrained)
    assert torch.equal(checkpoint["callbacks"][prune.state_key]["originals"][name], original)

    prune.on_validation_epoch_end(trainer, module)  # other callbacks still evaluate: the restraint stays in
    assert not torch.equal(W, unrestrained)
    prune.on_validation_end(trainer, module)
    assert torch.equal(W, unrestrained)

    prune.on_fit_end(trainer, module)  # export: restrained weights on disk, unrestrained ones kept in memory
    assert torch.equal(W, unrestrained)
    exported = type(tiny_model).from_pretrained(tmp_path / "export").state_dict()[f"{name}.weight"]
    torch.testing.assert_close(exported.double(), _reference(original, unrestrained, "e"), rtol=0, atol=1e-5)


def test_inloop_restrains_in_place_every_n_steps(tiny_llama, char_tokenizer, tmp_path):
    module = _bound_module(tiny_llama, char_tokenizer, tmp_path)
    prune = PruneRestraint(mode="inloop", every_n_steps=2, log_base=2)
    prune.on_fit_start(SimpleNamespace(global_step=0), module)
    original = next(iter(prune.originals.values())).clone()
    _, W = _inflate(module)
    unrestrained = W.detach().clone()
    prune.on_train_batch_end(SimpleNamespace(global_step=1), module, None, [], 0)
    assert torch.equal(W, unrestrained) and prune.restraints == 0
    prune.on_train_batch_end(SimpleNamespace(global_step=2), module, None, [], 1)
    torch.testing.assert_close(W.double(), _reference(original, unrestrained, 2.0), rtol=0, atol=1e-5)
    assert prune.restraints == 1
    # validation does not swap anything in inloop mode
    prune.on_validation_start(_fitting(global_step=2), module)
    assert not prune._shadow


def test_should_restrain_is_the_overridable_policy(tiny_llama, char_tokenizer, tmp_path):
    class FromStepTwo(PruneRestraint):
        def should_restrain(self, step: int) -> bool:
            return step >= 2

    module = _bound_module(tiny_llama, char_tokenizer, tmp_path)
    prune = FromStepTwo()
    prune.on_fit_start(None, module)
    _, W = _inflate(module)
    before = W.detach().clone()
    prune.on_validation_start(_fitting(global_step=1), module)
    assert torch.equal(W, before)
    prune.on_validation_start(_fitting(global_step=2), module)
    assert not torch.equal(W, before)
    assert [PruneRestraint(mode="inloop", every_n_steps=3).should_restrain(s) for s in range(7)] == [
        False, False, False, True, False, False, True
    ]  # fmt: skip


# -- arguments and state ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"mode": "sometimes"}, "mode"),
        ({"log_base": "pi"}, "log_base"),
        ({"log_base": 1.0}, "log_base"),
        ({"log_base": 0.5}, "log_base"),
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"rank": 0}, "rank"),
        ({"niter": -1}, "niter"),
    ],
)
def test_arguments_are_validated(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}:"):
        PruneRestraint(**kwargs)


def test_state_key():
    assert PruneRestraint().state_key == "PruneRestraint{'mode': 'posthoc', 'log_base': 'e', 'every_n_steps': 1}"
    assert PruneRestraint(mode="inloop", log_base=2, every_n_steps=5).state_key == (
        "PruneRestraint{'mode': 'inloop', 'log_base': 2.0, 'every_n_steps': 5}"
    )
    assert ConditionNumberMonitor(every_n_steps=3).state_key == "ConditionNumberMonitor{'every_n_steps': 3}"


# -- whole runs through the CLI ----------------------------------------------------------------------------------------
def _args(run: dict[str, Path], config: str, root: Path, *extra: str) -> list[str]:
    """MEMIT on blocks 1-2 of the tiny model with a small lambda, so the accumulated edit of block 2 outgrows
    sigma_max(W) within three edits, evaluated after every step."""
    small_lambda = ["--model.method.init_args.mom2_weight", "1e-4", "--model.method.init_args.target_lr", "2.0"]
    return tiny_fit_args(run, config, root, *small_lambda, "--trainer.val_check_interval", "1", *extra)


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    state = torch.load(checkpoint, weights_only=True, map_location="cpu")["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("model.")}


def _callback(cli, kind: type):
    return next(cb for cb in cli.trainer.callbacks if isinstance(cb, kind))


def test_posthoc_keeps_the_editing_trajectory_and_survives_a_resume(tiny_run, tiny_llama, tmp_path):
    cli_main(_args(tiny_run, "memit", tmp_path / "plain"))
    every_step = [
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        f"--trainer.callbacks.dirpath={tmp_path / 'prune' / 'steps'}",
        "--trainer.callbacks.every_n_train_steps=1",
        "--trainer.callbacks.save_top_k=-1",
        "--trainer.callbacks.filename={step}",
    ]
    cli = cli_main(_args(tiny_run, "memit_prune", tmp_path / "prune", *every_step))
    prune = _callback(cli, PruneRestraint)
    assert prune.restraints == 3 and prune.restrained["model.layers.2.mlp.down_proj"] >= 1  # it did restrain

    # the edited weights are exactly those of the run without PRUNE
    plain = _weights(tmp_path / "plain" / "checkpoints" / "last.ckpt")
    with_prune = _weights(
        tmp_path / "prune" / "steps" / "step=3.ckpt"
    )  # (the extra ModelCheckpoint replaces last.ckpt)
    assert plain.keys() == with_prune.keys() and len(plain) == 2
    for key in plain:
        assert torch.equal(plain[key], with_prune[key]), key

    # the checkpoint carries the originals as plain tensors under the callback's state key
    checkpoint = torch.load(tmp_path / "prune" / "steps" / "step=1.ckpt", weights_only=True, map_location="cpu")
    entry = checkpoint["callbacks"][prune.state_key]
    unedited = tiny_llama.state_dict()
    assert set(entry["originals"]) == {"model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"}
    for name, tensor in entry["originals"].items():
        assert torch.equal(tensor, unedited[f"{name}.weight"])
        assert entry["sigma_max"][name] == pytest.approx(float(torch.linalg.svdvals(tensor.double())[0]))
    assert entry["restraints"] == 0  # written right after the first edit, before its evaluation
    monitor = _callback(cli, ConditionNumberMonitor)
    assert "originals" not in checkpoint["callbacks"][monitor.state_key]  # shared with PRUNE, stored once

    # resumed after step 1: same final weights, originals restored (not re-taken from the edited model)
    resumed = cli_main(
        _args(
            tiny_run,
            "memit_prune",
            tmp_path / "resumed",
            "--ckpt_path",
            str(tmp_path / "prune" / "steps" / "step=1.ckpt"),
        )
    )
    for name, tensor in _callback(resumed, PruneRestraint).originals.items():
        assert torch.equal(tensor, unedited[f"{name}.weight"])
    final = _weights(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    for key in plain:
        torch.testing.assert_close(final[key], plain[key], msg=key)

    # a `validate` run of the checkpoint evaluates the restrained weights, with the originals from the checkpoint
    validate = ["validate", *_args(tiny_run, "memit_prune", tmp_path / "validate")[1:]]
    validate += ["--ckpt_path", str(tmp_path / "prune" / "steps" / "step=3.ckpt")]
    checked = _callback(cli_main(validate), PruneRestraint)
    assert checked.restrained["model.layers.2.mlp.down_proj"] >= 1
    assert all(torch.equal(t, unedited[f"{n}.weight"]) for n, t in checked.originals.items())

    # the monitor's curves and the summary
    rows = list(csv.DictReader(next((tmp_path / "prune").glob("csv/version_*/metrics.csv")).open()))
    stats = ("kappa", "sigma_max", "sigma_min", "weight_fro", "delta_2", "delta_fro", "restrained")
    assert {f"spectral/layer_02/{s}" for s in stats} <= set(rows[0])
    logged = [r for r in rows if r["spectral/layer_02/kappa"]]
    assert [float(r["edits/total"]) for r in logged] == [1.0, 2.0, 3.0]
    W = with_prune["model.model.layers.2.mlp.down_proj.weight"].double()
    s = torch.linalg.svdvals(W)
    assert float(logged[-1]["spectral/layer_02/kappa"]) == pytest.approx(float(s[0] / s[-1]), rel=1e-5)
    assert float(logged[-1]["spectral/layer_02/restrained"]) >= 1
    summary = json.loads((tmp_path / "prune" / "summary.json").read_text())
    assert summary["spectral"]["layer_02/kappa"] == pytest.approx(float(s[0] / s[-1]), rel=1e-5)
    assert set(summary["spectral"]) == {f"layer_{i:02d}/{s}" for i in (1, 2) for s in stats}


def test_inloop_changes_the_editing_trajectory(tiny_run, tmp_path):
    cli_main(_args(tiny_run, "memit", tmp_path / "plain"))
    inloop = ["--trainer.callbacks+=callbacks.PruneRestraint", "--trainer.callbacks.mode=inloop"]
    cli = cli_main(_args(tiny_run, "memit", tmp_path / "inloop", *inloop))
    assert _callback(cli, PruneRestraint).restraints == 3
    plain = _weights(tmp_path / "plain" / "checkpoints" / "last.ckpt")
    restrained = _weights(tmp_path / "inloop" / "checkpoints" / "last.ckpt")
    key = "model.model.layers.2.mlp.down_proj.weight"
    assert not torch.allclose(plain[key], restrained[key])
    assert _kappa(restrained[key]) < _kappa(plain[key])


def test_callbacks_after_prune_in_the_list_evaluate_the_restrained_weights(tiny_run, tmp_path):
    """A callback added after PRUNE with ``callbacks+=`` (as held-out perplexity would be) sees the restrained weights
    in ``on_validation_epoch_end``; editing still continues from the unrestrained ones."""
    cli = cli_main(
        _args(tiny_run, "memit_prune", tmp_path / "run", "--trainer.callbacks+=recorders.WeightsAtEvaluation")
    )
    prune = _callback(cli, PruneRestraint)
    recorder = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "WeightsAtEvaluation")
    assert cli.trainer.callbacks.index(recorder) > cli.trainer.callbacks.index(prune) and len(recorder.seen) == 3
    final = _weights(tmp_path / "run" / "checkpoints" / "last.ckpt")
    name = "model.layers.2.mlp.down_proj"
    unrestrained = final[f"model.{name}.weight"]
    seen = recorder.seen[-1][name]
    assert not torch.allclose(seen, unrestrained)
    torch.testing.assert_close(seen.double(), _reference(prune.originals[name], unrestrained, "e"), rtol=0, atol=1e-5)
