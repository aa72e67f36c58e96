"""WISE: side memory, router, shard masks, TIES merging, generate(), export and checkpoint state (tiny models)."""

from __future__ import annotations

import copy
import logging
import math
import random

import pytest
import torch
from helpers import callbacks_config, wise_fit_args
from transformers import LlamaConfig, Qwen2Config

from editing.methods import WISE
from editing.methods.wise import wise_preset
from editing.metrics import score_targets
from editing.router import Router, choose_memory, routing_scores
from editing.rows import encode_rows
from editing.side_memory import SideMemory, shard_mask, ties_merge
from editing.wise_export import export_edited, load_edited

MODULE = "model.layers.2.mlp.down_proj"


def small_wise(**kwargs) -> WISE:
    defaults = dict(
        module=2,
        prefixes=2,
        prefix_length=3,
        pool_size=4,
        steps=8,
        irrelevant_margin=0.5,
        edit_margin=2.0,
        gap_margin=1.0,
    )
    return WISE(**{**defaults, **kwargs})


def projection_input(model, tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Input activations ``(B, T, d_in)`` of the side-memory projection and the attention mask."""
    from editing.forward import capture
    from editing.rows import encode_rows

    rows = encode_rows(tokenizer, texts)
    return capture(model, rows, {MODULE: "input"})[MODULE], rows.attention_mask


def responsive_tau(a: torch.Tensor, mask: torch.Tensor, d_out: int, scale: float = 5.0) -> torch.Tensor:
    """A rank-1 task vector that reads the mean activation of one text: large score on it, smaller elsewhere."""
    direction = (a * mask[..., None]).sum((0, 1)) / mask.sum()
    direction = direction / direction.norm()
    out = torch.zeros(d_out)
    out[0] = scale
    return out[:, None] * direction[None]


def scores_of(model, tokenizer, texts: list[str], tau: torch.Tensor) -> torch.Tensor:
    a, mask = projection_input(model, tokenizer, texts)
    return routing_scores(a, tau, mask, None)


def install(model, memory: SideMemory, taus: list[torch.Tensor], thresholds: list[float]) -> Router:
    memory.sealed = list(taus)
    memory.sealed_min = list(thresholds)
    memory.sealed_texts = [[("x", "y")] for _ in taus]
    router = Router(memory, None)
    router.attach(model, MODULE)
    return router


def logits(model, tokenizer, texts: list[str]) -> torch.Tensor:
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


# -- TIES and shard masks ----------------------------------------------------------------------------------------
def test_ties_merge_matches_hand_computation():
    t1 = torch.tensor([[4.0, -1.0], [0.5, 2.0]])
    t2 = torch.tensor([[-3.0, -2.0], [0.1, 6.0]])
    # density 0.5 keeps the two largest magnitudes of each: t1 -> [[4, 0], [0, 2]], t2 -> [[-3, 0], [0, 6]]
    # signs: entry (0,0): 4 - 3 > 0 -> +, keeps 4 only; (1,1): both + -> mean(2, 6) = 4; the rest are 0
    merged = ties_merge([t1, t2], density=0.5)
    assert torch.equal(merged, torch.tensor([[4.0, 0.0], [0.0, 4.0]]))


def test_ties_merge_disjoint_mean_ignores_disagreeing_and_zero_entries():
    t1 = torch.tensor([1.0, 2.0, 0.0, -5.0])
    t2 = torch.tensor([3.0, -1.0, 4.0, 0.0])
    t3 = torch.tensor([5.0, -0.5, 0.0, 1.0])
    merged = ties_merge([t1, t2, t3], density=1.0)
    # entry 0: all +, mean 3; entry 1: 2 - 1 - 0.5 > 0 -> keep 2; entry 2: only t2 -> 4; entry 3: -5 + 1 < 0 -> -5
    assert torch.allclose(merged, torch.tensor([3.0, 2.0, 4.0, -5.0]))


def test_ties_merge_elects_plus_on_an_exact_tie():
    merged = ties_merge([torch.tensor([1.0, -2.0]), torch.tensor([-1.0, 2.0])], density=1.0)
    # both weighted sums are exactly 0: + is elected (the release), so only the positive value counts
    assert torch.equal(merged, torch.tensor([1.0, 2.0]))


def test_ties_merge_weighted_disjoint_mean():
    new1, new2, previous = torch.tensor([4.0, -3.0]), torch.tensor([0.0, -1.0]), torch.tensor([2.0, 1.0])
    merged = ties_merge([new1, new2, previous], density=1.0, weights=[0.2, 0.2, 0.6])
    # entry 0: + elected; (0.2 * 4 + 0.6 * 2) / (0.2 + 0.6) = 2.5 (the zero counts in neither sum)
    # entry 1: 0.2 * -3 + 0.2 * -1 + 0.6 * 1 = -0.2 -> -; (0.2 * -3 + 0.2 * -1) / (0.2 + 0.2) = -2
    assert torch.allclose(merged, torch.tensor([2.5, -2.0]))


def test_shard_masks_are_seeded_of_the_asked_density_and_differ_by_shard():
    a = shard_mask((100, 200), 0.2, seed=3, shard=0)
    assert torch.equal(a, shard_mask((100, 200), 0.2, seed=3, shard=0))
    assert abs(a.float().mean().item() - 0.2) < 0.01
    assert not torch.equal(a, shard_mask((100, 200), 0.2, seed=3, shard=1))


def test_routing_scores_mean_over_real_tokens_and_max_for_long_inputs():
    a = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [9.0, 9.0]]])  # third token is padding
    tau = torch.eye(2)
    mask = torch.tensor([[1, 1, 0]])
    assert torch.allclose(routing_scores(a, tau, mask, None), torch.tensor([1.5]))
    assert torch.allclose(routing_scores(a, tau, mask, 1), torch.tensor([2.0]))


def test_centred_scores_ignore_the_component_every_input_shares():
    common = torch.tensor([10.0, 0.0])
    a = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]) + common  # two tokens sharing a large common component
    tau, mask = torch.eye(2), torch.ones(1, 2)
    assert routing_scores(a, tau, mask, None).item() > 10  # the paper's score: dominated by what all inputs share
    assert torch.allclose(routing_scores(a, tau, mask, None, centre=common), torch.tensor([1.0]))
    assert torch.allclose(routing_scores(a, tau, mask, 0, centre=common), torch.tensor([1.0]))  # 0: max for every row


def test_centred_wise_routes_by_its_centre_and_resumes_with_the_same_one(tiny_llama, bind, tiny_requests):
    method = bind(small_wise(score="centred"), tiny_llama)
    centre = method.router.centre
    assert centre is not None and centre.shape == (tiny_llama.config.intermediate_size,)
    again = bind(small_wise(score="centred"), tiny_llama)  # what a resumed run computes at set-up
    assert torch.equal(again.router.centre, centre)
    assert bind(small_wise(), tiny_llama).router.centre is None  # the paper's score by default


# -- editing --------------------------------------------------------------------------------------------------------
def test_edit_changes_only_masked_entries_of_the_side_memory(tiny_model, bind, tiny_requests):
    method = bind(small_wise(weight_decay=0.0), tiny_model)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    method.apply(tiny_requests[:1], method.prepare(tiny_requests[:1]))
    after = tiny_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the main weights must stay frozen"
    tau = method.memory.working
    mask = method.memory.current_mask()
    assert tau[mask].abs().max() > 0
    assert torch.all(tau[~mask] == 0), "entries outside the shard's mask must not learn"
    assert tau.abs().max() <= method.norm_constraint


def test_edit_raises_target_probability_through_the_router(tiny_llama, bind, char_tokenizer, tiny_requests):
    request = tiny_requests[0]
    before = score_targets(tiny_llama, char_tokenizer, [request.text], [request.target_new]).nll
    method = bind(small_wise(steps=30, lr=0.5), tiny_llama)
    method.apply([request], method.prepare([request]))
    after = score_targets(tiny_llama, char_tokenizer, [request.text], [request.target_new]).nll
    assert method.router.last_route.tolist() == [0], "the edited prompt must be routed to the side memory"
    assert after < before - 0.5
    assert method.memory.working_texts == [(request.text, request.target_new)]
    assert math.isfinite(method.memory.working_min)


def test_bfloat16_training_copy_learns_the_edit_like_the_model_and_answers_nothing_itself(
    tiny_llama, bind, char_tokenizer, tiny_requests
):
    request = tiny_requests[0]
    before = score_targets(tiny_llama, char_tokenizer, [request.text], [request.target_new]).nll
    taus, after = {}, {}
    for precision in ("model", "bfloat16"):
        model = copy.deepcopy(tiny_llama)  # each method hooks its own router into the model
        method = bind(small_wise(steps=30, lr=0.5, stop_loss=0.0, train_precision=precision), model)
        runner = method._runner[0]
        if precision == "model":
            assert runner is None, "the model's own precision needs no copy"
        else:
            assert runner.dtype == torch.bfloat16 and not any(p.requires_grad for p in runner.parameters())
            assert not runner.get_submodule(MODULE)._forward_hooks, "the copy must not carry the router"
        method.apply([request], method.prepare([request]))
        taus[precision] = method.memory.working
        after[precision] = score_targets(model, char_tokenizer, [request.text], [request.target_new]).nll
    assert taus["bfloat16"].dtype == torch.float32
    assert after["bfloat16"] < before - 0.5, "training through the bfloat16 copy must learn the edit"
    assert abs(after["bfloat16"] - after["model"]) < 0.25 * (before - after["model"])
    cos = torch.nn.functional.cosine_similarity(taus["model"].flatten(), taus["bfloat16"].flatten(), dim=0)
    assert cos > 0.9, f"the bfloat16 copy's task vector must follow the float32 one (cosine {cos:.3f})"


def test_rehearsal_trains_earlier_edits_of_the_memory_again(tiny_llama, bind, char_tokenizer, tiny_requests):
    first, second = tiny_requests[:2]
    nll = {}
    for rehearse in (0, 1):
        model = copy.deepcopy(tiny_llama)  # each method hooks its own router into the model
        method = bind(small_wise(steps=30, lr=0.5, rehearse=rehearse, stop_loss=0.0), model)
        method.apply([first], method.prepare([first]))
        plan = method.prepare([second])
        assert plan.edit_rows == len(method.templates)
        assert len(plan.rows) == plan.edit_rows + rehearse
        if rehearse:  # the rehearsed row is the earlier edit, bare, with its target
            ids = plan.rows.input_ids[-1][plan.rows.attention_mask[-1].bool()].tolist()
            assert char_tokenizer.decode(ids).startswith(first.text)
        method.apply([second], plan)
        assert method.step_log()["train/wise_rehearsed"] == rehearse
        nll[rehearse] = score_targets(model, char_tokenizer, [first.text], [first.target_new]).nll
    assert nll[1] < nll[0], "rehearsing the first edit must keep it better learned than training on the second alone"


def test_threshold_quantile_keeps_held_out_sentences_out_as_the_memory_grows(tiny_llama, bind, tiny_requests):
    held_out = bind(small_wise(threshold_quantile=0.5, pool_size=8), copy.deepcopy(tiny_llama)).held_out
    assert len(held_out) == 8
    routed = {}
    for quantile in (None, 0.5):
        model = copy.deepcopy(tiny_llama)  # each method hooks its own router into the model
        method = bind(small_wise(slack=0.01, threshold_quantile=quantile, pool_size=8), model)
        thresholds = []
        for request in tiny_requests[:2]:
            method.apply([request], method.prepare([request]))
            scores, threshold = method.scores_of([(text, "") for text in held_out])
            thresholds.append(float(threshold[-1]))
            routed[quantile] = float((scores[-1] > threshold[-1]).float().mean())
        if quantile is not None:
            assert thresholds[1] != thresholds[0], "the floor is recomputed when the memory changes"
            assert method.step_log()["wise/threshold"] == thresholds[1]
    assert routed[None] == 1.0, "a slack of 0.01 alone routes every unrelated sentence"
    assert routed[0.5] <= 0.5


def test_threshold_quantile_holds_out_part_of_a_file_pool_that_training_never_draws(
    tmp_path, tiny_llama, bind, tiny_requests
):
    sentences = [f"unrelated sentence number {i}" for i in range(12)]
    (tmp_path / "pool.txt").write_text("\n".join(sentences))
    wise = small_wise(irrelevant_pool=str(tmp_path / "pool.txt"), threshold_quantile=0.9, pool_size=4)
    method = bind(wise, copy.deepcopy(tiny_llama))
    assert len(method.held_out) == 4, "the quantile's sentences are the file's own kind, not model samples"
    assert set(method.held_out).isdisjoint(method.pool) and sorted(method.held_out + method.pool) == sorted(sentences)
    rng = random.Random(0)
    drawn = {text for _ in range(50) for text, _ in method._irrelevant(tiny_requests[:1], rng)[0]}
    assert drawn <= set(method.pool), "training never draws a held-out sentence"
    (tmp_path / "three.txt").write_text("a b\nc d\ne f")
    assert len(WISE(irrelevant_pool=str(tmp_path / "three.txt"), threshold_quantile=0.9).held_out) == 1  # half, down
    (tmp_path / "one.txt").write_text("a b")
    with pytest.raises(ValueError, match="needs at least two"):
        WISE(irrelevant_pool=str(tmp_path / "one.txt"), threshold_quantile=0.9)
    assert WISE(irrelevant_pool=str(tmp_path / "one.txt")).pool == ["a b"], "without the quantile nothing is held out"


def test_weight_decay_pulls_the_whole_copy_toward_zero(tiny_model, bind, tiny_requests):
    lr, decay, steps = 0.5, 0.1, 3
    method = bind(small_wise(lr=lr, weight_decay=decay, steps=steps, stop_loss=0.0), tiny_model)
    method.apply(tiny_requests[:1], method.prepare(tiny_requests[:1]))
    assert method.step_log()["train/wise_steps"] == steps
    assert set(method.timings) == {"capture", "train"} and method.timings["train"] > 0
    mask = method.memory.current_mask()
    w = method._frozen_weight()
    # outside the mask only the decay acts: W' <- (1 - lr * decay) W' each step, so tau = ((1 - lr decay)^n - 1) W
    expected = ((1 - lr * decay) ** steps - 1) * w
    torch.testing.assert_close(method.memory.working[~mask], expected[~mask], rtol=1e-4, atol=1e-6)
    assert (method.memory.working[mask] - expected[mask]).abs().max() > 1e-3, "masked entries also learn the edit"


def test_margin_terms_average_over_their_positive_entries():
    excess = torch.tensor([3.0, -1.0, 1.0, -5.0])
    assert WISE()._hinge(excess) == 2.0  # (3 + 1) / 2, the release
    assert WISE(margin_average="all")._hinge(excess) == 1.0  # (3 + 1) / 4
    assert WISE()._hinge(torch.tensor([-1.0, -2.0])) == 0.0


def test_early_stop_needs_a_low_and_flat_loss(tiny_llama, bind, tiny_requests):
    # every loss is below stop_loss; the first iteration has no previous loss to be flat against
    method = bind(small_wise(stop_loss=1e9, stop_flatness=1e9), tiny_llama)
    method.apply(tiny_requests[:1], method.prepare(tiny_requests[:1]))
    assert method.step_log()["train/wise_steps"] == 1
    method = bind(small_wise(stop_loss=1e9, stop_flatness=0.0, steps=4), tiny_llama)
    method.apply(tiny_requests[:1], method.prepare(tiny_requests[:1]))
    assert method.step_log()["train/wise_steps"] == 4, "a loss that still moves does not stop"


@pytest.mark.parametrize(
    ("config", "block", "slack", "score"),
    [
        (LlamaConfig(num_hidden_layers=32, hidden_size=4096, vocab_size=32000), 27, 0.88, "paper"),  # Llama-2-7B
        (LlamaConfig(num_hidden_layers=32, hidden_size=4096, vocab_size=128256), 29, 0.5, "paper"),  # Llama-3-8B
        (Qwen2Config(num_hidden_layers=28, hidden_size=3584), 23, 0.88, "paper"),  # Qwen2.5-7B
        (LlamaConfig(num_hidden_layers=30, hidden_size=576, vocab_size=49152), 4, 0.8, "centred"),  # SmolLM2-135M
    ],
)
def test_side_memory_block_slack_and_score_per_model(config, block, slack, score):
    preset = wise_preset(config)
    assert (preset.block, preset.slack, preset.score) == (block, slack, score)


def test_a_measured_preset_sets_block_slack_and_centred_score_and_settings_override_it(tiny_llama, bind, monkeypatch):
    import editing.methods.wise as wise

    preset = wise.WisePreset("tiny", "llama", 4, 32, None, block=1, slack=0.8, score="centred", source="measured")
    monkeypatch.setattr(wise, "WISE_PRESETS", (preset,))
    method = bind(small_wise(module=None), tiny_llama)
    assert (method.block, method.memory.slack, method.score) == (1, 0.8, "centred")
    assert method.router.centre is not None
    method = bind(small_wise(module=2, slack=0.5, score="paper"), tiny_llama)
    assert (method.block, method.memory.slack, method.router.centre) == (2, 0.5, None)


def test_pool_questions_make_every_second_sampled_sentence_a_question(tiny_llama, bind):
    def starts(pool: list[str], words: list[str]) -> bool:
        return len(pool) == len(words) and all(text.startswith(word) for text, word in zip(pool, words, strict=True))

    assert starts(bind(small_wise(pool_questions=True), tiny_llama).pool, ["The", "Who", "In", "What"])
    assert starts(bind(small_wise(), tiny_llama).pool, ["The", "In", "A", "It"])


def test_subject_swaps_are_the_edit_prompt_around_other_words_owned_by_their_edit(tiny_llama, bind, tiny_requests):
    method = bind(small_wise(subject_swaps=3), tiny_llama)
    irrelevant, owner, swapped = method._irrelevant(tiny_requests[:2], random.Random(0))
    assert owner.tolist() == [0, 1, 0, 0, 0, 1, 1, 1]  # the pool sentence of each request, then its swaps
    assert [f"{prompt} {tiny_requests[i].target_new}" for prompt, i in zip(swapped, owner[2:].tolist())] == [
        text for text, _ in irrelevant[2:]
    ], "the swapped prompts alone are the swaps' irrelevant rows without the target"
    for (text, _), i in zip(irrelevant[2:], owner[2:].tolist(), strict=True):
        head, tail = tiny_requests[i].prompt.split("{}")
        assert text.startswith(head) and text.endswith(f"{tail} {tiny_requests[i].target_new}")
        assert tiny_requests[i].subject not in text
    assert len({text for text, _ in irrelevant[2:5]}) == 3


def last_token_log_probs(model, tokenizer, prompts: list[str]) -> torch.Tensor:
    """``(N, V)`` next-token log-probabilities at the end of each prompt."""
    rows = encode_rows(tokenizer, prompts)
    with torch.no_grad():
        out = model(input_ids=rows.input_ids, attention_mask=rows.attention_mask).logits
    return out[torch.arange(len(prompts)), rows.last_prompt_pos].float().log_softmax(-1)


def test_swap_kl_keeps_the_unedited_output_on_subject_swapped_prompts(tiny_llama, bind, char_tokenizer, tiny_requests):
    request = tiny_requests[0]
    drift, kept_prompts = {}, []
    for weight in (5.0, 0.0):
        model = copy.deepcopy(tiny_llama)  # each method hooks its own router into the model
        method = bind(small_wise(subject_swaps=3, swap_kl=weight, steps=60, lr=1.0, stop_loss=0.0), model)
        drawn = []
        draw = method._irrelevant
        method._irrelevant = lambda requests, rng: drawn.append(draw(requests, rng)) or drawn[-1]
        plan = method.prepare([request])
        assert plan.kept == (3 if weight else 0) and len(plan.rows) == plan.edit_rows + plan.kept
        kept_prompts = kept_prompts or drawn[0][2]  # the first run's swapped prompts, scored in both runs
        method.apply([request], plan)
        with method.router.disabled():
            unedited = last_token_log_probs(model, char_tokenizer, kept_prompts)
            with method.training_pass(model, method.memory.working):  # the memory answers, routed or not
                edited = last_token_log_probs(model, char_tokenizer, kept_prompts)
                nll = score_targets(model, char_tokenizer, [request.text], [request.target_new]).nll
        before = score_targets(tiny_llama, char_tokenizer, [request.text], [request.target_new]).nll
        assert nll < before - 0.5, "the edit is learned with and without the term"
        drift[weight] = torch.nn.functional.kl_div(edited, unedited, reduction="batchmean", log_target=True).item()
        if weight:
            assert method.step_log()["train/wise_swap_kl"] >= 0
        else:
            assert "train/wise_swap_kl" not in method.step_log()
    assert drift[5.0] < 0.5 * drift[0.0], f"KL to the unedited outputs: {drift}"


def test_swap_kl_needs_subject_swaps():
    with pytest.raises(ValueError, match="swap_kl: .*subject_swaps"):
        small_wise(swap_kl=1.0)


def test_irrelevant_per_edit_draws_distinct_sentences_owned_by_their_edit(tiny_llama, bind, tiny_requests):
    method = bind(small_wise(irrelevant_per_edit=3), tiny_llama)
    irrelevant, owner, _ = method._irrelevant(tiny_requests[:2], random.Random(0))
    assert owner.tolist() == [0, 0, 0, 1, 1, 1]
    assert all(len({text for text, _ in irrelevant[i : i + 3]}) == 3 for i in (0, 3))
    assert {text for text, _ in irrelevant} <= set(method.pool)
    probes = bind(small_wise(irrelevant_per_edit=3, irrelevant_pool="locality"), tiny_llama)
    irrelevant, owner, _ = probes._irrelevant(tiny_requests[:2], random.Random(0))
    assert owner.tolist() == [0, 0, 1], "as many as the request's locality probes hold"
    assert sorted(text for text, _ in irrelevant[:2]) == ["Ghana is in Madrid", "The capital of France is Paris"]


def test_more_irrelevant_sentences_per_edit_lower_the_pool_sentences_scores(tiny_llama, bind, tiny_requests):
    scores = {}
    for per_edit in (1, 4):
        wise = small_wise(irrelevant_per_edit=per_edit, steps=20, margin_average="all")  # configs/wise.yaml's average
        method = bind(wise, copy.deepcopy(tiny_llama))
        for request in tiny_requests[:2]:
            method.apply([request], method.prepare([request]))
        pool_scores, _ = method.scores_of([(text, "") for text in method.pool])
        scores[per_edit] = pool_scores[-1]
    assert scores[4].max() < scores[1].max()
    assert scores[4].mean() < scores[1].mean()


def test_other_models_get_three_quarters_depth_and_slack_088_logged(tiny_llama, bind, caplog):
    assert wise_preset(tiny_llama.config) is None
    with caplog.at_level(logging.INFO, logger="editing.methods.wise"):
        method = bind(small_wise(module=None), tiny_llama)
    assert method.block == 3 and method.memory.slack == 0.88  # int(0.75 * 4 blocks)
    assert "at 3/4 depth" in caplog.text and "slack 0.88" in caplog.text


def test_next_shard_uses_a_new_mask_and_saves_the_old_one(tiny_llama, bind, tiny_requests):
    method = bind(small_wise(weight_decay=0.0, merge_style="continue"), tiny_llama)
    method.apply(tiny_requests[:1], method.prepare(tiny_requests[:1]))
    first = method.memory.working.clone()
    method.memory.save_shard()
    assert torch.equal(method.memory.pending[0], first)
    assert torch.all(method.memory.working == 0)
    method.apply(tiny_requests[1:2], method.prepare(tiny_requests[1:2]))
    second_mask = method.memory.current_mask()
    assert torch.all(method.memory.working[~second_mask] == 0)
    second = method.memory.working.clone()
    preview, _ = method.memory.current()
    assert torch.equal(preview, ties_merge([first, second], 0.53)), "saved shards answer before their merge"
    assert len(method.memory.answering()) == 1
    method.memory.save_shard()
    method.memory.merge(retrieve=False)
    assert torch.equal(method.memory.working, ties_merge([first, second], 0.53))
    assert torch.equal(method.memory.base, method.memory.working) and method.memory.pending == []


# -- merging (hand-computed, TIES density 1) ---------------------------------------------------------------------
def bank(style: str) -> SideMemory:
    return SideMemory((1, 3), 1.0, 1.0, 0, ties_density=1.0, merge_style=style)


def edit_shard(memory: SideMemory, delta: list[float], score: float, save: bool = True) -> None:
    """One edit that adds ``delta`` to the working memory (with routing score ``score``), then a shard save."""
    memory.working = memory.working + torch.tensor([delta])
    memory.record_edits([(f"prompt {memory.edit_count()}", "target")], torch.tensor([score]))
    if save:
        memory.save_shard()


def test_wise_merge_as_released_past_a_second_merge():
    memory = bank("release")
    edit_shard(memory, [2.0, 1.0, -1.0], 3.0)
    assert torch.all(memory.working == 0), "a shard save resets the working memory to W"
    edit_shard(memory, [2.0, 0.0, 3.0], 5.0)
    memory.merge(retrieve=False)
    # first merge, 1/2 each: (2 + 2) / 2 = 2; 1 (the zero counts not); -0.5 + 1.5 > 0 -> + -> 3
    assert torch.allclose(memory.base, torch.tensor([[2.0, 1.0, 3.0]]))
    assert torch.all(memory.working == 0) and memory.pending == []
    assert [t for _, t in memory.answering()] == [3.0], "the merged memory answers, with its own threshold"
    edit_shard(memory, [4.0, -2.0, 0.0], 4.0)
    edit_shard(memory, [0.0, -2.0, -6.0], 6.0)
    memory.merge(retrieve=False)
    # second merge, new shards 0.4 / 2 = 0.2 each, previous merged memory 0.6:
    # entry 0: 0.8 + 0 + 1.2 > 0 -> (0.2 * 4 + 0.6 * 2) / (0.2 + 0.6) = 2.5
    # entry 1: -0.4 - 0.4 + 0.6 < 0 -> (0.2 * -2 + 0.2 * -2) / 0.4 = -2
    # entry 2: 0 - 1.2 + 1.8 > 0 -> only the merged memory's 3 agrees -> 3
    assert torch.allclose(memory.base, torch.tensor([[2.5, -2.0, 3.0]]))
    assert torch.all(memory.working == 0)
    assert len(memory.base_texts) == 4 and memory.working_texts == []
    assert [t for _, t in memory.answering()] == [3.0]
    edit_shard(memory, [0.0, 0.0, 1.0], 7.0, save=False)
    answering = memory.answering()
    assert len(answering) == 2, "the merged and the working memory answer side by side"
    assert answering[0][0] is memory.base and answering[1][0] is memory.working and answering[1][1] == 7.0
    assert memory.memory_texts() == [memory.base_texts, memory.working_texts]


def test_wise_merge_continue_style_starts_new_shards_from_the_merged_memory():
    memory = bank("continue")
    edit_shard(memory, [2.0, 1.0, -1.0], 3.0)
    edit_shard(memory, [2.0, 0.0, 3.0], 5.0)
    memory.merge(retrieve=False)
    assert torch.allclose(memory.working, torch.tensor([[2.0, 1.0, 3.0]])) and torch.equal(memory.base, memory.working)
    edit_shard(memory, [4.0, -2.0, 0.0], 4.0)  # shard [6, -1, 3]
    edit_shard(memory, [0.0, -2.0, -6.0], 6.0)  # shard [2, -1, -3]
    memory.merge(retrieve=False)
    # (6 + 2) / 2 = 4; (-1 - 1) / 2 = -1; 1.5 - 1.5 = 0 -> + -> 3
    assert torch.allclose(memory.working, torch.tensor([[4.0, -1.0, 3.0]]))
    assert len(memory.answering()) == 1 and memory.memory_texts() == [memory.base_texts]


@pytest.mark.parametrize("style", ["release", "continue"])
def test_rehearsal_draws_only_the_edits_the_trained_task_vector_holds(style):
    memory = bank(style)
    edit_shard(memory, [1.0, 0.0, 0.0], 3.0)  # shard 0, saved: it answers through the merge, not the fresh shard
    edit_shard(memory, [0.0, 1.0, 0.0], 3.0, save=False)
    assert memory.current_texts() == [("prompt 0", "target"), ("prompt 1", "target")]
    assert memory.trained_texts() == [("prompt 1", "target")]
    memory.merge(retrieve=False)
    edit_shard(memory, [0.0, 0.0, 1.0], 3.0, save=False)
    merged_into_start = memory.base_texts if style == "continue" else []  # continue: the shard starts from the merge
    assert memory.trained_texts() == [*merged_into_start, ("prompt 2", "target")]


def test_a_fresh_shard_rehearses_none_of_the_saved_shards_edits(tiny_llama, bind, tiny_requests):
    method = bind(small_wise(rehearse=4), tiny_llama)
    method.apply(tiny_requests[:1], method.prepare(tiny_requests[:1]))
    assert method.prepare(tiny_requests[1:2]).rows.input_ids.shape[0] == len(method.templates) + 1
    method.memory.save_shard()
    plan = method.prepare(tiny_requests[1:2])
    assert len(plan.rows) == plan.edit_rows, "the new shard, trained from W under its own mask, rehearses nothing"


def test_merged_and_working_memories_each_answer_their_own_edits(tiny_llama, char_tokenizer):
    texts = ["Paris is in France", "Tokyo is in Japan, an island nation"]
    d = tiny_llama.config.hidden_size
    old, new = (responsive_tau(*projection_input(tiny_llama, char_tokenizer, [t]), d) for t in texts)
    memory = SideMemory(tuple(old.shape), 1.0, 0.2, 0, ties_density=1.0)
    memory.working = old
    memory.record_edits([(texts[0], "")], torch.tensor([0.0]))
    memory.merge(retrieve=False)  # saves the unsaved shard first
    memory.working = new
    memory.record_edits([(texts[1], "")], torch.tensor([0.0]))
    router = Router(memory, None)
    router.attach(tiny_llama, MODULE)
    logits(tiny_llama, char_tokenizer, texts)
    assert router.last_route.tolist() == [0, 1], "the higher score wins: merged memory, then working memory"


def test_retrieve_merge_seals_its_lowest_edit_score_without_a_refresh():
    memory = bank("release")
    edit_shard(memory, [1.0, 0.0, 0.0], 3.0)
    edit_shard(memory, [0.0, 1.0, 0.0], 2.0)
    assert memory.working_min == math.inf
    memory.merge(retrieve=True)
    assert memory.sealed_min == [2.0] and [t for _, t in memory.answering()] == [2.0]
    edit_shard(memory, [0.0, 0.0, 1.0], 4.0, save=False)
    memory.merge(retrieve=True)  # unsaved edits are saved first, none is lost
    assert memory.sealed_min == [2.0, 4.0] and torch.equal(memory.sealed[1], torch.tensor([[0.0, 0.0, 1.0]]))


def test_resume_refuses_another_merge_style():
    memory = bank("release")
    edit_shard(memory, [1.0, 0.0, 0.0], 3.0)
    memory.merge(retrieve=False)
    with pytest.raises(ValueError, match="same merge_style"):
        bank("continue").set_extra_state(memory.get_extra_state())


# -- routing ----------------------------------------------------------------------------------------------------------
def test_unrelated_input_below_threshold_gives_exactly_the_unedited_output(tiny_llama, char_tokenizer):
    texts = ["The capital of Spain is", "Bananas are yellow and sweet"]
    reference = logits(tiny_llama, char_tokenizer, texts)
    a, mask = projection_input(tiny_llama, char_tokenizer, texts[:1])
    tau = responsive_tau(a, mask, tiny_llama.config.hidden_size)
    scores = scores_of(tiny_llama, char_tokenizer, texts, tau)
    assert scores[0] > scores[1]
    memory = SideMemory(tuple(tau.shape), 1.0, 0.2, 0)
    router = install(tiny_llama, memory, [tau], [float(scores.mean())])  # threshold between the two
    routed = logits(tiny_llama, char_tokenizer, texts)  # one batch: each sequence routed on its own
    assert router.last_route.tolist() == [0, -1]
    assert torch.equal(routed[1], reference[1]), "an unrouted sequence must see exactly the unedited model"
    assert not torch.allclose(routed[0], reference[0])


def test_retrieval_picks_the_memory_that_holds_the_edit(tiny_llama, char_tokenizer):
    texts = ["Paris is in France", "Tokyo is in Japan, an island nation"]
    d = tiny_llama.config.hidden_size
    taus = [responsive_tau(*projection_input(tiny_llama, char_tokenizer, [t]), d) for t in texts]
    a, mask = projection_input(tiny_llama, char_tokenizer, texts)
    own = torch.stack([routing_scores(a, tau, mask, None) for tau in taus])  # (memory, text)
    assert own[0, 0] > own[0, 1] and own[1, 1] > own[1, 0]
    memory = SideMemory(tuple(taus[0].shape), 1.0, 0.2, 0)
    router = install(tiny_llama, memory, taus, [0.0, 0.0])  # both memories above threshold everywhere: highest wins
    logits(tiny_llama, char_tokenizer, texts)
    assert router.last_route.tolist() == [0, 1]


def test_choose_memory_takes_the_highest_score_among_memories_above_their_own_threshold():
    scores = torch.tensor([[5.0, 9.0, 1.0, 4.0], [8.0, 3.0, 2.0, 6.0]])  # (memory, row)
    thresholds = torch.tensor([4.5, 7.0])
    # row 0: both above, 8 > 5; row 1: only memory 0 above; row 2: neither; row 3: memory 1 is below its threshold
    assert choose_memory(scores, thresholds).tolist() == [1, 0, -1, -1]
    # relative to the thresholds, row 0 is 5 / 4.5 = 1.11 for memory 0 against 8 / 7 = 1.14: still memory 1
    assert choose_memory(scores, thresholds, "ratio").tolist() == [1, 0, -1, -1]
    assert choose_memory(scores, torch.tensor([4.5, 7.5]), "ratio").tolist() == [0, 0, -1, -1]  # 1.11 > 1.07
    assert choose_memory(scores, torch.tensor([4.5, 7.5]), "score").tolist() == [1, 0, -1, -1]


def test_generate_routes_once_from_the_prompt(tiny_llama, char_tokenizer):
    prompts = ["The capital of Spain is", "Bananas"]
    a, mask = projection_input(tiny_llama, char_tokenizer, prompts[:1])
    tau = responsive_tau(a, mask, tiny_llama.config.hidden_size, scale=20.0)
    scores = scores_of(tiny_llama, char_tokenizer, prompts, tau)
    threshold = float(scores.mean())

    def greedy(model, texts):
        batch = char_tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
        out = model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=0)
        return out[:, batch["input_ids"].shape[1] :]

    unedited = greedy(tiny_llama, prompts)
    edited_everywhere = type(tiny_llama)(tiny_llama.config).eval()
    edited_everywhere.load_state_dict(tiny_llama.state_dict())
    with torch.no_grad():
        edited_everywhere.get_submodule(MODULE).weight += tau
    always = greedy(edited_everywhere, prompts)
    memory = SideMemory(tuple(tau.shape), 1.0, 0.2, 0)
    install(tiny_llama, memory, [tau], [threshold])
    routed = greedy(tiny_llama, prompts)
    assert torch.equal(routed[0], always[0]), "the routed prompt keeps its side memory for every generated token"
    assert torch.equal(routed[1], unedited[1]), "the unrouted prompt generates exactly as the unedited model"
    assert not torch.equal(always[0], unedited[0])


# -- state -----------------------------------------------------------------------------------------------------------
def test_checkpoint_state_round_trip(tiny_llama, bind, tiny_requests, char_tokenizer):
    method = bind(small_wise(), tiny_llama)
    method.apply(tiny_requests[:1], method.prepare(tiny_requests[:1]))
    method.memory.save_shard()
    method.apply(tiny_requests[1:2], method.prepare(tiny_requests[1:2]))
    method.memory.merge(retrieve=True)
    state = {k: v for k, v in method.state_dict().items()}
    restored = SideMemory(method.memory.shape, method.memory.slack, 0.5, 7, module=MODULE)
    restored.set_extra_state(state["memory._extra_state"])
    assert restored.shard == method.memory.shard and restored.seed == method.memory.seed
    assert [t for t, _ in restored.answering()][0].equal(method.memory.answering()[0][0])
    assert restored.sealed_texts == method.memory.sealed_texts
    with pytest.raises(ValueError, match="resume with the same model"):
        SideMemory((3, 3), 0.88, 0.2, 0).set_extra_state(state["memory._extra_state"])


@pytest.mark.parametrize(
    ("setting", "message"),
    [({"module": "model.layers.3.mlp.down_proj"}, "module: .*layers.2.*"), ({"score": "centred"}, "score: .*'paper'")],
)
def test_resume_refuses_a_memory_of_another_block_or_score(tiny_llama, bind, tiny_requests, setting, message):
    """A memory of one block has the shape of every block's: a resume whose settings resolve elsewhere (a changed
    preset, another ``module`` or ``score``) must fail, not load the memory into the wrong place."""
    method = bind(small_wise(), tiny_llama)
    method.apply(tiny_requests[:1], method.prepare(tiny_requests[:1]))
    state = method.memory.get_extra_state()
    other = SideMemory(method.memory.shape, 0.88, 0.2, 0, **{"module": MODULE, "score": "paper", **setting})
    with pytest.raises(ValueError, match=message):
        other.set_extra_state(state)
    legacy = {k: v for k, v in state.items() if k not in ("module", "score")}  # a checkpoint before session 7
    other.set_extra_state(legacy)


def test_export_reloads_and_routes_identically(tiny_llama, char_tokenizer, tmp_path):
    texts = ["The capital of Spain is", "Bananas are yellow and sweet"]
    a, mask = projection_input(tiny_llama, char_tokenizer, texts[:1])
    tau = responsive_tau(a, mask, tiny_llama.config.hidden_size)
    scores = scores_of(tiny_llama, char_tokenizer, texts, tau)
    memory = SideMemory(tuple(tau.shape), 0.9, 0.2, 0)
    memory.working = tau
    memory.working_texts, memory.working_min = [("x", "y")], float(scores.mean()) / 0.9
    router = Router(memory, None, centre=torch.zeros(a.shape[-1]), retrieval="ratio")  # a centre (zero: same routes)
    router.attach(tiny_llama, MODULE)
    expected = logits(tiny_llama, char_tokenizer, texts)
    export_edited(tmp_path / "export", tiny_llama, char_tokenizer, router, MODULE)
    model, tokenizer, loaded = load_edited(tmp_path / "export")
    tokenizer.padding_side = "right"
    got = logits(model, tokenizer, texts)
    assert loaded.last_route.tolist() == router.last_route.tolist() == [0, -1]
    assert torch.allclose(got, expected, atol=1e-5)
    assert loaded.centre is not None and torch.equal(loaded.centre, router.centre)
    assert loaded.retrieval == "ratio"


# -- bad input ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("module", "message"),
    [
        ("model.layers.2.mlp.nope", "does not exist"),
        ("model.layers.2.mlp", "not a linear projection"),
        ("lm_head", "inside a decoder block"),
        (9, "does not exist"),
    ],
)
def test_bad_side_memory_module_is_a_clear_error(tiny_llama, bind, module, message):
    with pytest.raises(ValueError, match=message):
        bind(small_wise(module=module), tiny_llama)


def test_empty_irrelevant_pool_is_a_clear_error(tmp_path):
    empty = tmp_path / "pool.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="pool is empty"):
        WISE(irrelevant_pool=str(empty))
    with pytest.raises(ValueError, match="does not exist"):
        WISE(irrelevant_pool=str(tmp_path / "missing.txt"))


# -- command line -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("retrieve", [False, True])
def test_cli_shards_merge_log_routing_and_resume_state(tiny_run, retrieve):
    import csv
    import json

    from main import cli_main

    root = tiny_run["root"]
    schedule = callbacks_config(
        root.parent / "schedule.yaml",
        ("callbacks.WiseMemory", {"save_freq": 1, "merge_freq": 2, "retrieve": retrieve}),
        ("callbacks.RoutingMonitor", {}),
    )
    cli_main(wise_fit_args(tiny_run, root, "--config", str(schedule)))
    summary = json.loads((root / "summary.json").read_text())
    assert summary["method"] == "WISE" and summary["protocol"]["total_edits"] == 3
    assert {"efficacy", "generalization", "locality"} <= set(summary["metrics"])
    assert {"edit/routed", "unrelated/q50", "threshold"} <= set(summary["routing"])
    rows = list(csv.DictReader(next(root.glob("csv/version_*/metrics.csv")).open()))
    assert {"routing/edit/q50", "routing/unrelated/routed", "wise/merges", "train/wise_steps"} <= set(rows[0])
    own = [float(r["routing/edit/own_memory"]) for r in rows if r.get("routing/edit/own_memory")]
    assert own and all(0.0 <= v <= 1.0 for v in own)  # several memories answer (a sealed or merged one + current)
    state = torch.load(root / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    memory = state["state_dict"]["method.memory._extra_state"]
    assert not any(k.startswith("model.") for k in state["state_dict"]), "the frozen model is not checkpointed"
    assert memory["shard"] == 3  # three shards saved (save_freq 1), one merge after edit 2
    assert len(memory["sealed"]) == (1 if retrieve else 0)
    assert len(memory["pending"]) == 1  # the third shard waits for the next merge


def test_merge_freq_must_be_a_multiple_of_save_freq():
    from callbacks import WiseMemory

    with pytest.raises(ValueError, match="multiple of save_freq"):
        WiseMemory(save_freq=3, merge_freq=5)


@pytest.mark.parametrize("retrieve", [False, True])
def test_cli_resume_mid_stream_gives_the_same_memories(tiny_run, tmp_path, retrieve):
    from main import cli_main

    wise = ("callbacks.WiseMemory", {"save_freq": 1, "merge_freq": 2, "retrieve": retrieve})
    every = {"dirpath": str(tmp_path / "every"), "every_n_train_steps": 1, "save_top_k": -1, "filename": "{step}"}
    keep = callbacks_config(tmp_path / "keep.yaml", wise, ("lightning.pytorch.callbacks.ModelCheckpoint", every))
    schedule = callbacks_config(tmp_path / "schedule.yaml", wise)
    cli_main(wise_fit_args(tiny_run, tmp_path / "full", "--config", str(keep)))
    resume = ["--config", str(schedule), "--ckpt_path", str(tmp_path / "every" / "step=1.ckpt")]
    cli_main(wise_fit_args(tiny_run, tmp_path / "resumed", *resume))

    def memory(path):
        return torch.load(path, weights_only=False, map_location="cpu")["state_dict"]["method.memory._extra_state"]

    full = memory(tmp_path / "every" / "step=3.ckpt")
    resumed = memory(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert full["shard"] == resumed["shard"] == 3
    assert full["working_texts"] == resumed["working_texts"]
    for key in ("working", "base"):
        torch.testing.assert_close(resumed[key], full[key])
    for key in ("pending", "sealed"):
        torch.testing.assert_close(resumed[key], full[key])
    assert (full["base"] is None) == retrieve  # WISE-Retrieve seals memories instead of merging into one


def test_wise_callbacks_refuse_other_methods():
    from types import SimpleNamespace

    from callbacks import RoutingMonitor, WiseMemory
    from editing.methods import MEMIT

    module = SimpleNamespace(method=MEMIT())
    for callback in (WiseMemory(), RoutingMonitor()):
        with pytest.raises(ValueError, match="needs model.method to be editing.methods.WISE"):
            callback.setup(None, module, "fit")
