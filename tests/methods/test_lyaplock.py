"""Tests for editing.methods.lyaplock: preservation loss, virtual queue and the drift-plus-penalty closed form."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import NULLSPACE_THRESHOLD

from editing.methods.alphaedit import AlphaEdit
from editing.methods.lyaplock import LyapLock, next_queue, preservation_loss
from editing.methods.memit import MEMIT

D_V, D_K, N = 5, 8, 2
F64 = dict(dtype=torch.float64)


def _spd(d: int, gen: torch.Generator) -> torch.Tensor:
    A = torch.randn(d, 2 * d, generator=gen, **F64)
    return A @ A.T / (2 * d) + 1e-2 * torch.eye(d, **F64)


class _Weight:
    """Stands in for :class:`editing.models.EditedWeight` where only shapes and device matter (``setup_state``)."""

    def __init__(self, w: torch.Tensor) -> None:
        self.parameter = torch.nn.Parameter(w.float(), requires_grad=False)

    def get(self) -> torch.Tensor:
        return self.parameter


def _method(n_layers: int = 2, seed: int = 0, **kwargs):
    """A LyapLock with hand-registered W0 / C0 per layer (no model); returns it with the W0s and C0s."""
    gen = torch.Generator().manual_seed(seed)
    method = LyapLock(layers=list(range(n_layers)), **kwargs)
    w0s, c0s = [], []
    for i in range(n_layers):
        w0, c0 = torch.randn(D_V, D_K, generator=gen, **F64), _spd(D_K, gen)
        method.register_buffer(f"w0_{i}", w0)
        method.register_buffer(f"c0_{i}", c0)
        w0s.append(w0)
        c0s.append(c0)
    weights = {f"layer{i}": _Weight(w) for i, w in enumerate(w0s)}
    method.edited_weights = lambda: weights
    method.setup_state()
    return method, w0s, c0s


def _batch(gen: torch.Generator, scale: float = 1.0):
    return torch.randn(D_K, N, generator=gen, **F64), scale * torch.randn(D_V, N, generator=gen, **F64)


def _explicit_d(W, W0, C0) -> float:
    return float(torch.trace((W - W0) @ C0 @ (W - W0).T))


# -- the two formulas ----------------------------------------------------------------------------------------------
def test_preservation_loss_is_the_trace_form():
    gen = torch.Generator().manual_seed(3)
    W0, W, C0 = torch.randn(D_V, D_K, generator=gen, **F64), torch.randn(D_V, D_K, generator=gen, **F64), _spd(D_K, gen)
    assert float(preservation_loss(W, W0, C0)) == pytest.approx(_explicit_d(W, W0, C0), rel=1e-12)
    assert float(preservation_loss(W0, W0, C0)) == 0.0
    # difference form: exact for a tiny change of a huge weight, where tr(W C0 W^T) - ... would cancel
    big = 1e8 * W0
    tiny = 1e-6 * torch.randn(D_V, D_K, generator=gen, **F64)
    assert float(preservation_loss(big + tiny, big, C0)) == pytest.approx(
        _explicit_d(tiny, torch.zeros_like(tiny), C0), rel=1e-3
    )


@pytest.mark.parametrize(
    "Q, ratio, expected",
    [(1.0, 2.0, 2.0), (3.0, 0.5, 2.5), (1.2, 0.0, 1.0), (5.0, 0.0, 4.0), (1.0, 1.0, 1.0), (2.0, 1.5, 2.5)],
)
def test_next_queue_recursion_with_floor(Q, ratio, expected):
    budget, d_base = 4.0, 0.3
    D = ratio * budget * d_base  # ratio = D / budget
    got = next_queue(torch.tensor(Q, **F64), torch.tensor(D, **F64), budget, torch.tensor(d_base, **F64))
    assert float(got) == pytest.approx(max(Q + ratio - 1.0, 1.0), rel=1e-12)
    assert float(got) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(budget=0.0), "budget"),
        (dict(V=-1.0), "V"),
        (dict(mom2_weight=0), "mom2"),
        (dict(nullspace_threshold=0.0), "nullspace_threshold"),
        (dict(l2=-1.0), "l2"),
        (dict(l2=0.0, nullspace_threshold=2e-2), "l2"),  # the projected system A P alone is singular
    ],
)
def test_rejects_bad_arguments(kwargs, field):
    with pytest.raises(ValueError, match=field):
        LyapLock(**kwargs)


# -- step 1 --------------------------------------------------------------------------------------------------------
def test_state_is_allocated_per_layer_and_checkpointed():
    method, _, _ = _method()
    state = method.state_dict()
    for i in range(2):
        assert float(state[f"queue_{i}"]) == 1.0 and float(state[f"d_base_{i}"]) == 0.0
        assert state[f"svk_{i}"].shape == (D_V, D_K) and state[f"skk_{i}"].shape == (D_K, D_K)
        assert state[f"svk_{i}"].dtype == torch.float64
    assert int(state["steps_done"]) == 0


def test_step_one_is_memit_anchored_at_w0():
    lam = 7.0
    method, (W0, _), (C0, _) = _method(mom2_weight=lam)
    gen = torch.Generator().manual_seed(1)
    K, R = _batch(gen)
    W = W0 + 0.1 * torch.randn(D_V, D_K, generator=gen, **F64)  # a current weight that already moved
    delta = method.solve(0, W, K, R)
    Wn = W + delta
    grad = (Wn @ K - (W @ K + R)) @ K.T + lam * (Wn - W0) @ C0
    assert grad.abs().max() < 1e-10 * (R @ K.T).abs().max()
    torch.testing.assert_close(delta, (R @ K.T + lam * (W0 - W) @ C0) @ torch.linalg.inv(K @ K.T + lam * C0))
    # at W = W0 it is exactly MEMIT with the same lambda
    memit = MEMIT(layers=[0], mom2_weight=lam)
    memit.register_buffer("c0_0", C0)
    torch.testing.assert_close(method.solve(0, W0, K, R), memit.solve(0, W0, K, R))


def test_step_one_sets_d_base_and_budget():
    budget = 5.0
    method, w0s, c0s = _method(budget=budget, mom2_weight=3.0)
    gen = torch.Generator().manual_seed(2)
    new_weights = []
    for i in range(2):
        K, R = _batch(gen)
        W1 = w0s[i] + method.solve(i, w0s[i], K, R)
        method.after_layer_update(i, W1, K)
        new_weights.append(W1)
        torch.testing.assert_close(method.skk_0 if i == 0 else method.skk_1, K @ K.T)
        torch.testing.assert_close(method.svk_0 if i == 0 else method.svk_1, W1 @ K @ K.T)
    method.after_step()
    assert int(method.steps_done) == 1
    for i in range(2):
        d1 = _explicit_d(new_weights[i], w0s[i], c0s[i])
        assert d1 > 0
        assert float(method.state(i, "d_base")) == pytest.approx(d1, rel=1e-10)
        # D(W1) / (budget D_base) = 1 / budget < 1: the queue stays at its floor
        assert float(method.state(i, "queue")) == 1.0
        assert float(method.state(i, "budget_ratio")) == pytest.approx(1.0 / budget)


# -- steps t >= 2 ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("V", [1.0, 2.5])
def test_later_steps_solve_the_weighted_replay_problem(V):
    """Drive five steps on two layers; each step t >= 2 must be the minimiser of
    V||W'K1 - (WK1 + R)||^2 + V sum_p ||W'K_p - V_p||^2 + lambda Q_t tr[(W'-W0) C0 (W'-W0)^T]
    with the past keys / values kept here as explicit lists and Q_t recomputed independently."""
    lam, budget = 2.0, 1.0  # a tight budget: the queue must grow as edits accumulate
    method, w0s, c0s = _method(budget=budget, V=V, mom2_weight=lam)
    gen = torch.Generator().manual_seed(4)
    W = [w.clone() for w in w0s]
    past: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[], []]
    queue, d_base = [1.0, 1.0], [None, None]
    grown = False
    for step in range(5):
        for i in range(2):
            K, R = _batch(gen, scale=3.0)
            assert float(method.state(i, "queue")) == pytest.approx(queue[i], rel=1e-10)
            delta = method.solve(i, W[i], K, R)
            Wn = W[i] + delta
            if step == 0:
                grad = (Wn @ K - (W[i] @ K + R)) @ K.T + lam * (Wn - w0s[i]) @ c0s[i]
            else:
                grad = V * (Wn @ K - (W[i] @ K + R)) @ K.T + lam * queue[i] * (Wn - w0s[i]) @ c0s[i]
                for Kp, Vp in past[i]:
                    grad = grad + V * (Wn @ Kp - Vp) @ Kp.T
            assert grad.abs().max() < 1e-9 * (R @ K.T).abs().max(), (step, i)
            W[i] = Wn
            method.after_layer_update(i, Wn, K)
            past[i].append((K, Wn @ K))  # V_p recorded right after the update
            D = _explicit_d(Wn, w0s[i], c0s[i])
            if step == 0:
                d_base[i] = D
            queue[i] = max(queue[i] + D / (budget * d_base[i]) - 1.0, 1.0)
            grown |= queue[i] > 1.0
            assert float(method.state(i, "d_base")) == pytest.approx(d_base[i], rel=1e-10)
            assert float(method.state(i, "queue")) == pytest.approx(queue[i], rel=1e-10)
        method.after_step()
    assert grown, "the test never exercised a queue above its floor"
    # the replay sums are the sums of the explicit lists
    for i in range(2):
        torch.testing.assert_close(method.state(i, "skk"), sum(Kp @ Kp.T for Kp, _ in past[i]))
        torch.testing.assert_close(method.state(i, "svk"), sum(Vp @ Kp.T for Kp, Vp in past[i]))


def test_queue_grows_over_budget_and_decays_back_to_one():
    budget = 2.0
    method, [W0], [C0] = _method(n_layers=1, budget=budget)
    gen = torch.Generator().manual_seed(6)
    direction = torch.randn(D_V, D_K, generator=gen, **F64)
    K = torch.randn(D_K, N, generator=gen, **F64)
    unit = _explicit_d(W0 + direction, W0, C0)

    def weight_with_loss(d: float) -> torch.Tensor:
        return W0 + (d / unit) ** 0.5 * direction  # D is quadratic in the distance from W0

    method.after_layer_update(0, weight_with_loss(1.0), K)  # step 1: D_base = 1, budget * D_base = 2
    method.after_step()
    assert float(method.d_base_0) == pytest.approx(1.0, rel=1e-10)
    expected = [1.0]
    for d in [8.0, 6.0, 0.0, 1.0, 0.0, 0.0, 0.0]:  # ratios 4, 3, 0, 0.5, 0, 0, 0
        method.after_layer_update(0, weight_with_loss(d), K)
        method.after_step()
        expected.append(max(expected[-1] + d / (budget * 1.0) - 1.0, 1.0))
        assert float(method.queue_0) == pytest.approx(expected[-1], rel=1e-9)
    assert expected == pytest.approx([1.0, 4.0, 6.0, 5.0, 4.5, 3.5, 2.5, 1.5])
    for _ in range(2):
        method.after_layer_update(0, W0, K)
        method.after_step()
    assert float(method.queue_0) == 1.0  # floor
    assert float(method.d_base_0) == pytest.approx(1.0, rel=1e-10)  # D_base is set once, at step 1


def test_large_queue_pulls_the_update_towards_w0():
    """The same step-2 problem with a larger queue changes the weight less as measured by D."""
    losses = []
    for q in (1.0, 50.0):
        method, [W0], [C0] = _method(n_layers=1, mom2_weight=1.0)
        gen = torch.Generator().manual_seed(8)
        K, R = _batch(gen)
        W1 = W0 + method.solve(0, W0, K, R)
        method.after_layer_update(0, W1, K)
        method.after_step()
        method.queue_0.fill_(q)
        K2, R2 = _batch(gen)
        losses.append(_explicit_d(W1 + method.solve(0, W1, K2, R2), W0, C0))
    assert losses[1] < losses[0]


# -- with AlphaEdit's null-space projection --------------------------------------------------------------------------
PROJECTION_THRESHOLD = 0.3  # splits the spectrum of the _spd test matrices: both parts non-empty (asserted)


def _kept_directions(C0: torch.Tensor, threshold: float) -> torch.Tensor:
    eigvals, eigvecs = torch.linalg.eigh(C0)
    return eigvecs[:, eigvals >= threshold]


def test_projection_is_derived_state_and_absent_without_the_switch():
    method, _, (C0, _) = _method(nullspace_threshold=PROJECTION_THRESHOLD)
    kept = _kept_directions(C0, PROJECTION_THRESHOLD)
    assert 0 < kept.shape[1] < D_K
    P = method.state(0, "projection")
    torch.testing.assert_close(P @ P, P)
    assert (P @ kept).abs().max() < 1e-12
    assert not any(key.startswith("projection") for key in method.state_dict())
    plain, _, _ = _method()
    assert not hasattr(plain, "projection_0")


@pytest.mark.parametrize("l2", [10.0, 0.5])
def test_projected_steps_solve_the_replay_problem_in_the_null_space(l2):
    """Four steps on one layer with the projection: every update leaves the retained directions of C0 untouched and
    minimises the step's LyapLock objective + l2 ||Delta||^2 over updates Delta = X P (gradient times P is zero)."""
    lam, budget = 2.0, 1.0
    method, [W0], [C0] = _method(
        n_layers=1, budget=budget, mom2_weight=lam, nullspace_threshold=PROJECTION_THRESHOLD, l2=l2
    )
    kept, P = _kept_directions(C0, PROJECTION_THRESHOLD), method.state(0, "projection")
    gen = torch.Generator().manual_seed(12)
    W, past = W0.clone(), []
    for step in range(4):
        K, R = _batch(gen, scale=3.0)
        Q = float(method.state(0, "queue"))
        delta = method.solve(0, W, K, R)
        assert (delta @ kept).abs().max() < 1e-10 * delta.abs().max()
        Wn = W + delta
        grad = (Wn @ K - (W @ K + R)) @ K.T + lam * Q * (Wn - W0) @ C0 + l2 * delta
        for Kp, Vp in past:
            grad = grad + (Wn @ Kp - Vp) @ Kp.T
        assert (grad @ P).abs().max() < 1e-9 * (R @ K.T).abs().max(), step
        method.after_layer_update(0, Wn, K)
        method.after_step()
        past.append((K, Wn @ K))
        W = Wn
    assert float(method.state(0, "queue")) > 1.0  # the queue acted on the projected updates too
    assert ((W - W0) @ kept).abs().max() < 1e-10 * (W - W0).abs().max()


def test_projected_step_one_without_preservation_weight_is_alphaedit():
    """At W = W0 with lambda -> 0 nothing but the projection and the ridge constrains step 1: AlphaEdit's update."""
    method, [W0], [C0] = _method(n_layers=1, mom2_weight=1e-12, nullspace_threshold=PROJECTION_THRESHOLD, l2=3.0)
    alphaedit = AlphaEdit(layers=[0], nullspace_threshold=PROJECTION_THRESHOLD, l2=3.0)
    alphaedit.register_buffer("c0_0", C0)
    alphaedit.setup_state()
    K, R = _batch(torch.Generator().manual_seed(13))
    torch.testing.assert_close(method.solve(0, W0, K, R), alphaedit.solve(0, W0, K, R))


# -- end to end ----------------------------------------------------------------------------------------------------
def test_lyaplock_end_to_end(tiny_model, method_kwargs, bind, edit_and_check, tiny_requests):
    lam = 100.0
    reference = copy.deepcopy(tiny_model)
    method = bind(LyapLock(mom2_weight=lam, budget=1.0, **method_kwargs), tiny_model)

    step1 = edit_and_check(method, tiny_model, tiny_requests[:2])
    assert step1["nll_after"].mean() < step1["nll_before"].mean() - 0.1, (step1["nll_before"], step1["nll_after"])
    assert int(method.steps_done) == 1
    for i, w in enumerate(method.edited_weights().values()):
        d1 = float(preservation_loss(w.get().double(), method.w0(i).double(), method.c0(i)))
        assert float(method.state(i, "d_base")) == pytest.approx(d1, rel=1e-6)

    # step 1 is MEMIT with the same lambda on the same model
    memit = bind(MEMIT(mom2_weight=lam, **method_kwargs), reference)
    memit.apply(tiny_requests[:2], memit.prepare(tiny_requests[:2]))
    for mine, theirs in zip(method.edited_weights().values(), memit.edited_weights().values(), strict=True):
        torch.testing.assert_close(mine.get(), theirs.get(), atol=1e-5, rtol=1e-4)

    step2 = edit_and_check(method, tiny_model, tiny_requests[2:])
    gap_before = (step2["h_before"] - step2["z"]).norm(dim=0)
    gap_after = (step2["h_after"] - step2["z"]).norm(dim=0)
    assert (gap_after < 0.8 * gap_before).all(), (gap_before, gap_after)
    assert int(method.steps_done) == 2
    log = method.step_log()
    queues = []
    for i, layer in enumerate(method.layers):
        ratio = log[f"lyaplock/layer_{layer:02d}/budget_ratio"]
        w = list(method.edited_weights().values())[i]
        d2 = float(preservation_loss(w.get().double(), method.w0(i).double(), method.c0(i)))
        assert ratio == pytest.approx(d2 / (1.0 * float(method.state(i, "d_base"))), rel=1e-6)
        # Q_2 = 1, so Q_3 = max(ratio, 1)
        assert log[f"lyaplock/layer_{layer:02d}/queue"] == pytest.approx(max(ratio, 1.0), rel=1e-9)
        queues.append(log[f"lyaplock/layer_{layer:02d}/queue"])
    assert max(queues) > 1.0  # with budget = 1 the budget is D_base: a second batch of edits exceeds it


def test_lyaplock_with_nullspace_end_to_end(tiny_model, method_kwargs, bind, edit_and_check, tiny_requests):
    """Two steps on a tiny model with the projection: the edits land and the accumulated change leaves C0's retained
    directions untouched (up to the float32 rounding of the stored weight)."""
    threshold = NULLSPACE_THRESHOLD[tiny_model.config.model_type]
    # as in the AlphaEdit end-to-end test: l2 1 and a tighter clamp keep a one-step write within half a null space
    method = bind(
        LyapLock(
            mom2_weight=1.0, budget=1.0, nullspace_threshold=threshold, l2=1.0, clamp_norm_factor=0.3, **method_kwargs
        ),
        tiny_model,
    )
    for requests in (tiny_requests[:2], tiny_requests[2:]):
        out = edit_and_check(method, tiny_model, requests)
        gap_before = (out["h_before"] - out["z"]).norm(dim=0)
        gap_after = (out["h_after"] - out["z"]).norm(dim=0)
        assert (gap_after < 0.8 * gap_before).all(), (gap_before, gap_after)
    assert int(method.steps_done) == 2
    for i, w in enumerate(method.edited_weights().values()):
        kept = _kept_directions(method.c0(i), threshold)
        assert 0 < kept.shape[1] < len(kept)
        change = w.get().double() - method.w0(i).double()
        assert (change @ kept).abs().max() < 1e-4 * change.abs().max()
