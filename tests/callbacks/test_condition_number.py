"""Tests for callbacks.condition_number: the spectral statistics, the monitor's hooks, its state and checkpoint."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from callbacks import ConditionNumberMonitor, PruneRestraint
from editing.methods import FineTune
from editing.spectral import singular_value_range, spectral_stats


def _with_singular_values(s: list[float], m: int, n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, len(s), dtype=torch.float64, generator=gen)).Q
    V = torch.linalg.qr(torch.randn(n, len(s), dtype=torch.float64, generator=gen)).Q
    return U @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ V.T


def test_stats_of_a_matrix_with_known_singular_values():
    W = _with_singular_values([10.0, 5.0, 1.0, 0.5], 4, 6)
    delta = _with_singular_values([3.0, 2.0], 4, 6, seed=1)
    stats = spectral_stats(W, W - delta)
    assert stats["kappa"] == pytest.approx(20.0, rel=1e-10)
    s = torch.linalg.svdvals(W)
    assert stats["kappa"] == pytest.approx(float(s.max() / s.min()), rel=1e-12)
    assert stats["sigma_max"] == pytest.approx(10.0) and stats["sigma_min"] == pytest.approx(0.5)
    assert stats["weight_fro"] == pytest.approx(math.sqrt(100 + 25 + 1 + 0.25))
    assert stats["delta_2"] == pytest.approx(3.0) and stats["delta_fro"] == pytest.approx(math.sqrt(13.0))
    unedited = spectral_stats(W, W)
    assert unedited["delta_2"] == unedited["delta_fro"] == 0.0
    assert spectral_stats(torch.zeros(3, 4), torch.zeros(3, 4))["kappa"] == math.inf


@pytest.mark.parametrize("shape", [(30, 50), (50, 30)])
def test_gram_path_for_large_matrices_matches_the_exact_svd(shape):
    M = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    exact = singular_value_range(M, exact_max_dim=64)
    gram = singular_value_range(M, exact_max_dim=8)  # smaller side 30 > 8: eigenvalues of the 30 x 30 Gram matrix
    assert gram == pytest.approx(exact, rel=1e-10)


def _module(model, char_tokenizer, tmp_path):
    method = FineTune(layer=2)
    method.setup(model, char_tokenizer, "tiny", tmp_path)
    logged: dict[str, float] = {}
    return SimpleNamespace(
        method=method,
        edits_done=torch.tensor(0),
        log_dict=lambda values, batch_size: logged.update(values),
        logged=logged,
    )


def test_hooks_log_every_n_steps_against_the_originals(tiny_model, char_tokenizer, tmp_path):
    module = _module(tiny_model, char_tokenizer, tmp_path)
    monitor = ConditionNumberMonitor(every_n_steps=2)
    trainer = SimpleNamespace(callbacks=[monitor], global_step=0)
    monitor.on_fit_start(trainer, module)
    (weight,) = module.method.edited_weights().values()
    original = weight.parameter.detach().clone()
    with torch.no_grad():
        weight.parameter.add_(0.1)
    module.edits_done += 1

    trainer.global_step = 1
    monitor.on_train_batch_end(trainer, module, None, [object()], 0)
    assert module.logged == {}  # not a monitoring step (edits/total is the module's to log)
    trainer.global_step = 2
    monitor.on_train_batch_end(trainer, module, None, [object()], 1)
    expected = spectral_stats(weight.parameter, original)
    assert module.logged == {f"spectral/layer_02/{k}": v for k, v in expected.items()}
    assert module.logged["spectral/layer_02/delta_fro"] == pytest.approx(0.1 * math.sqrt(original.numel()), rel=1e-4)
    assert monitor.last == {k: v for k, v in module.logged.items() if k.startswith("spectral/")}


def test_with_prune_it_shares_the_originals_and_logs_the_restrained_count(tiny_llama, char_tokenizer, tmp_path):
    module = _module(tiny_llama, char_tokenizer, tmp_path)
    monitor, prune = ConditionNumberMonitor(), PruneRestraint()
    trainer = SimpleNamespace(callbacks=[monitor, prune], global_step=1)
    monitor.on_fit_start(trainer, module)  # listed first: PRUNE has no snapshot yet, and the monitor takes none
    prune.on_fit_start(trainer, module)
    assert not monitor.originals and prune.originals
    (weight,) = module.method.edited_weights().values()
    with torch.no_grad():
        u, v = torch.randn(weight.parameter.shape[0], 1), torch.randn(weight.parameter.shape[1], 1)
        weight.parameter.add_(40 * u @ v.T / (u.norm() * v.norm()))
    monitor.on_train_batch_end(trainer, module, None, [object()], 0)
    assert module.logged["spectral/layer_02/restrained"] == 1.0
    assert module.logged["spectral/layer_02/delta_2"] == pytest.approx(40.0, rel=1e-5)
    checkpoint = {"callbacks": {monitor.state_key: monitor.state_dict()}}
    monitor.on_save_checkpoint(trainer, module, checkpoint)
    assert "originals" not in checkpoint["callbacks"][monitor.state_key]


def test_checkpoint_round_trip(tiny_llama, char_tokenizer, tmp_path):
    module = _module(tiny_llama, char_tokenizer, tmp_path)
    monitor = ConditionNumberMonitor(every_n_steps=3)
    trainer = SimpleNamespace(callbacks=[monitor], global_step=3)
    monitor.on_fit_start(trainer, module)
    monitor.on_train_batch_end(trainer, module, None, [object()], 0)
    checkpoint = {"callbacks": {monitor.state_key: monitor.state_dict()}}
    monitor.on_save_checkpoint(trainer, module, checkpoint)
    torch.save(checkpoint, tmp_path / "c.ckpt")

    loaded = torch.load(tmp_path / "c.ckpt", weights_only=True)
    entry = loaded["callbacks"]["ConditionNumberMonitor{'every_n_steps': 3}"]
    assert entry["last"] == monitor.last and entry["last"]
    restored = ConditionNumberMonitor(every_n_steps=3)
    restored.on_load_checkpoint(trainer, module, loaded)
    restored.load_state_dict(entry)
    assert restored.last == monitor.last
    assert restored.originals.keys() == monitor.originals.keys()
    for name, tensor in monitor.originals.items():
        assert torch.equal(restored.originals[name], tensor)
    restored.load_state_dict({})  # an older checkpoint without the entry
    assert restored.last == {}


def test_resume_without_originals_warns_and_stays_inactive(tiny_llama, char_tokenizer, tmp_path):
    module = _module(tiny_llama, char_tokenizer, tmp_path)
    module.edits_done += 5  # a checkpoint of an edited model that was not monitored
    monitor = ConditionNumberMonitor()
    trainer = SimpleNamespace(callbacks=[monitor], global_step=6)
    with pytest.warns(UserWarning, match="no original weights"):
        monitor.on_fit_start(trainer, module)
    monitor.on_train_batch_end(trainer, module, None, [object()], 0)
    assert module.logged == {}  # inactive: nothing to log


@pytest.mark.parametrize(("kwargs", "name"), [({"every_n_steps": 0}, "every_n_steps"), ({"exact_max_dim": 0}, "exact")])
def test_arguments_are_validated(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        ConditionNumberMonitor(**kwargs)
