"""Tests for editing.methods.memit (and the shared closed-form solver of editing.methods.base)."""

from __future__ import annotations

import pytest
import torch

from editing.methods.base import solve_right
from editing.methods.memit import MEMIT

D_V, D_K, N = 6, 10, 3


def _spd(d: int, gen: torch.Generator) -> torch.Tensor:
    A = torch.randn(d, 3 * d, dtype=torch.float64, generator=gen)
    return A @ A.T / (3 * d) + 1e-3 * torch.eye(d, dtype=torch.float64)


def _problem(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(D_V, D_K, dtype=torch.float64, generator=gen)
    K = torch.randn(D_K, N, dtype=torch.float64, generator=gen)
    R = torch.randn(D_V, N, dtype=torch.float64, generator=gen)
    return W, K, R, _spd(D_K, gen)


def _memit(lam: float, *c0s: torch.Tensor) -> MEMIT:
    method = MEMIT(layers=list(range(len(c0s))), mom2_weight=lam)
    for i, c0 in enumerate(c0s):
        method.register_buffer(f"c0_{i}", c0)
    return method


def test_solve_right_is_b_times_inverse():
    gen = torch.Generator().manual_seed(1)
    A = torch.randn(5, 5, dtype=torch.float64, generator=gen) + 5 * torch.eye(5, dtype=torch.float64)  # not symmetric
    B = torch.randn(3, 5, dtype=torch.float64, generator=gen)
    X = solve_right(B, A)
    torch.testing.assert_close(X @ A, B)
    torch.testing.assert_close(X, B @ torch.linalg.inv(A))


@pytest.mark.parametrize("lam", [0.5, 20.0])
def test_memit_solve_minimises_least_squares_with_c0_penalty(lam):
    W, K, R, C0 = _problem()
    delta = _memit(lam, C0).solve(0, W, K, R)
    assert delta.shape == (D_V, D_K) and delta.dtype == torch.float64
    # stationarity of ||Delta K - R||^2 + lam tr(Delta C0 Delta^T)
    grad = (delta @ K - R) @ K.T + lam * delta @ C0
    assert grad.abs().max() < 1e-10 * (R @ K.T).abs().max()
    torch.testing.assert_close(delta, R @ K.T @ torch.linalg.inv(lam * C0 + K @ K.T))

    # it is a minimum: any perturbation raises the objective
    def objective(d):
        return ((d @ K - R) ** 2).sum() + lam * torch.trace(d @ C0 @ d.T)

    bump = 1e-3 * torch.randn(D_V, D_K, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    assert objective(delta + bump) > objective(delta)


def test_memit_solve_does_not_depend_on_current_weight():
    W, K, R, C0 = _problem()
    method = _memit(3.0, C0)
    torch.testing.assert_close(method.solve(0, W, K, R), method.solve(0, torch.zeros_like(W), K, R))


def test_memit_writes_residual_exactly_as_lambda_vanishes_and_nothing_as_it_grows():
    W, K, R, C0 = _problem()
    torch.testing.assert_close(_memit(1e-9, C0).solve(0, W, K, R) @ K, R, atol=1e-6, rtol=1e-6)
    assert _memit(1e9, C0).solve(0, W, K, R).abs().max() < 1e-6


def test_memit_uses_the_statistic_of_its_layer():
    W, K, R, C0 = _problem()
    C1 = _spd(D_K, torch.Generator().manual_seed(9))
    method = _memit(2.0, C0, C1)
    torch.testing.assert_close(method.solve(1, W, K, R), R @ K.T @ torch.linalg.inv(2.0 * C1 + K @ K.T))
    assert not torch.allclose(method.solve(1, W, K, R), method.solve(0, W, K, R))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(layers=[2, 1]), "layers"),
        (dict(layers=[1, 1]), "layers"),
        (dict(layers=[]), "layers"),
        (dict(mom2_weight=0.0), "mom2_weight"),
        (dict(target_steps=0), "target_steps"),
        (dict(stats_tokens=0), "stats_tokens"),
    ],
)
def test_memit_rejects_bad_arguments(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MEMIT(**kwargs)


def test_memit_end_to_end(tiny_model, method_kwargs, bind, edit_and_check, tiny_requests):
    method = bind(MEMIT(mom2_weight=100.0, **method_kwargs), tiny_model)
    assert method.templates[0] == "{}" and len(method.templates) == 2
    for i in range(2):
        c0 = method.c0(i)
        assert c0.dtype == torch.float64 and torch.allclose(c0, c0.T)
    out = edit_and_check(method, tiny_model, tiny_requests)
    # the edit writes most of z - h at the subject position of the last edited layer ...
    gap_before = (out["h_before"] - out["z"]).norm(dim=0)
    gap_after = (out["h_after"] - out["z"]).norm(dim=0)
    assert (gap_after < 0.8 * gap_before).all(), (gap_before, gap_after)
    # ... and makes target_new more likely on the edited prompts
    assert out["nll_after"].mean() < out["nll_before"].mean() - 0.1, (out["nll_before"], out["nll_after"])


def test_memit_end_to_end_single_template_writes_z_exactly(
    tiny_llama, method_kwargs, bind, edit_and_check, tiny_requests
):
    """With the bare prompt as the only template and a vanishing lambda, the keys are exactly those of the evaluated
    prompt, so the residual spreading must land the last edited layer's output on z."""
    kwargs = {**method_kwargs, "context_seeds": []}
    method = bind(MEMIT(mom2_weight=1e-4, **kwargs), tiny_llama)
    assert method.templates == ["{}"]
    out = edit_and_check(method, tiny_llama, tiny_requests)
    gap_before = (out["h_before"] - out["z"]).norm(dim=0)
    gap_after = (out["h_after"] - out["z"]).norm(dim=0)
    assert (gap_after < 1e-3 * gap_before).all(), (gap_before, gap_after)
