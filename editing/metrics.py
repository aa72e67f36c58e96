"""Editing scores: the scoring functions (which probe counts as a hit), fluency of generations, and the torchmetrics
classes that sum them.

Every key means one thing per metric family (DESIGN.md section 8), so numbers of different definitions are never
reported under one name:

- ``counterfact`` family (ROME/MEMIT ``summarize.py``): one boolean per probe.

  - ``efficacy``: on the rewrite prompt the mean per-token NLL of ``target_new`` is lower than that of ``target_true``.
  - ``generalization``: the same comparison on every paraphrase.
  - ``specificity``: on every neighbourhood probe (a locality probe whose answer is the request's ``target_true``)
    ``target_true`` still beats ``target_new``.
  - ``locality``: agreement of the top-1 tokens at the answer positions with the unedited model's (below).
  - ``fluency``: ROME's generation entropy (:func:`weighted_ngram_entropy`, bits) of text generated from every
    generation prompt, mean per record, then mean over records. Only for requests with ``generation_prompts``.

- ``token`` family (ZsRE; MEMIT/AlphaEdit ``summarize.py``, EasyEdit): teacher-forced top-1 token accuracy.

  - ``efficacy`` (reliability): accuracy of the ``target_new`` tokens after the rewrite prompt.
  - ``generalization``: the same on every paraphrase.
  - ``specificity``: accuracy of the gold answer (``probe.answer``) on ``probe.gold_prompt or probe.prompt`` (for
    ZsRE ``loc + "?"``): the "Spe." column of LyapLock and AlphaEdit, which is *not* WISE's locality.
  - ``locality`` (WISE, EasyEdit): agreement of the top-1 tokens at the answer positions of every locality probe
    (on ``probe.prompt``) with the unedited model's, whatever the gold answer is.

Token accuracies are averaged per case by default (``averaging="case"``): the accuracy of each probe's tokens, then
the mean over probes, as the harnesses do. One right 1-token answer and one wrong 3-token answer score 0.50, where
pooling all tokens (``averaging="pooled"``, one hit per token) gives 0.25. In ZsRE every record has one rewrite, one
paraphrase and one locality probe, so per probe is per record; where a record has several, each probe counts once.

The locality reference is taken before the first edit. The metric classes keep summed states, so what they reduce
across processes is exact: a sum of per-case scores and their count, whose ratio is the mean over cases.

Consistency (ROME's TF-IDF cosine between generations and reference text about ``target_new``) is not computed: the
shipped data has no reference snippets, and a made-up reference would give a number that is not ROME's.
"""

from __future__ import annotations

import contextlib
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torchmetrics import Metric
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from editing.forward import target_log_probs
from editing.requests import EditRequest
from editing.rows import encode_rows, mean_per_row

TokenAveraging = Literal["case", "pooled"]
Sampling = Literal["top5", "greedy"]


class HitRate(Metric):
    """Mean of the scores seen: ``sum(scores) / count``, reducible across processes by sum.

    A score is a hit (bool) or a per-case accuracy in [0, 1]; with per-case scores the result is the mean over cases.

    Example:
        >>> metric = HitRate()
        >>> metric.update(torch.tensor([True, False, True]))
        >>> metric.update(torch.tensor([1.0]))
        >>> metric.compute()
        tensor(0.7500)
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    hits: torch.Tensor
    total: torch.Tensor

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("hits", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, hits: torch.Tensor) -> None:
        self.hits += hits.double().sum()
        self.total += hits.numel()

    def compute(self) -> torch.Tensor:
        return (self.hits / self.total).float() if self.total > 0 else torch.tensor(float("nan"))


class MeanScore(HitRate):
    """Mean of per-record scores that are not rates (fluency in bits): the same summed states as :class:`HitRate`.

    Example:
        >>> metric = MeanScore()
        >>> metric.update(torch.tensor([4.5, 5.5]))
        >>> metric.update(torch.tensor([6.5]))
        >>> metric.compute()
        tensor(5.5000)
    """


def average_per_case(scores: torch.Tensor, owners: torch.Tensor, n_cases: int | None = None) -> torch.Tensor:
    """The mean score of each case, from flat scores and the case that owns each: ``(N,), (N,) -> (n_cases,)``.

    The harnesses average token hits within a case first, so a long answer weighs as much as a short one.

    Example (one right 1-token answer, one wrong 3-token answer: 0.50 per case, 0.25 pooled):
        >>> per_case = average_per_case(torch.tensor([True, False, False, False]), torch.tensor([0, 1, 1, 1]))
        >>> per_case, per_case.mean()
        (tensor([1., 0.]), tensor(0.5000))
    """
    n = int(owners.max()) + 1 if n_cases is None and owners.numel() else (n_cases or 0)
    sums = torch.zeros(n, dtype=torch.float64, device=scores.device).index_add_(0, owners, scores.double())
    counts = torch.bincount(owners, minlength=n)
    return (sums / counts).float()


def token_hits(correct: Sequence[torch.Tensor], averaging: TokenAveraging = "case") -> torch.Tensor:
    """Token hits of teacher-forced rows (one per probe) as HitRate input: one accuracy per row (``"case"``), or
    every token's hit (``"pooled"``).

    Example:
        >>> rows = [torch.tensor([True]), torch.tensor([False, False, False])]
        >>> token_hits(rows), token_hits(rows, "pooled")
        (tensor([1., 0.]), tensor([ True, False, False, False]))
    """
    if averaging == "pooled":
        return torch.cat(list(correct))
    if averaging != "case":
        raise ValueError(f"token_averaging must be 'case' or 'pooled', got {averaging!r}")
    lengths = torch.tensor([len(c) for c in correct])
    owners = torch.repeat_interleave(torch.arange(len(correct)), lengths)
    return average_per_case(torch.cat(list(correct)), owners, len(correct))


@dataclass
class TokenScores:
    """Per-row teacher-forced results: mean target NLL, and the model's top-1 prediction at every target token."""

    nll: torch.Tensor  # (B,)
    predictions: list[torch.Tensor]  # B tensors of (target_len,)
    correct: list[torch.Tensor]  # B bool tensors of (target_len,)


@torch.no_grad()
def score_targets(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    targets: Sequence[str],
    batch_size: int = 64,
    progress: str | None = None,
) -> TokenScores:
    """Teacher-force each ``target`` after its ``prompt`` and score every target token, in batches (a progress bar
    named ``progress`` over the rows when given and there is more than one batch)."""
    nll, predictions, correct = [], [], []
    bar = tqdm(total=len(prompts), desc=progress, unit="probe", disable=progress is None or len(prompts) <= batch_size)
    for start in range(0, len(prompts), batch_size):
        rows = encode_rows(
            tokenizer, prompts[start : start + batch_size], None, targets[start : start + batch_size], model.device
        )
        log_p, r, ids = target_log_probs(model, rows)
        token_lp = log_p.gather(1, ids[:, None])[:, 0]
        top1 = log_p.argmax(-1)
        counts = (rows.target_ids >= 0).sum(1).tolist()
        nll.append(mean_per_row(-token_lp, r, len(rows)))
        predictions += list(top1.split(counts))
        correct += list((top1 == ids).split(counts))
        bar.update(len(rows))
    bar.close()
    return TokenScores(torch.cat(nll).cpu(), [p.cpu() for p in predictions], [c.cpu() for c in correct])


def _probe_rows(requests: Sequence[EditRequest]) -> tuple[list[str], list[str]]:
    prompts = [p.prompt for r in requests for p in r.locality]
    answers = [p.answer for r in requests for p in r.locality]
    return prompts, answers


def locality_predictions(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest]
) -> dict[str, list[list[int]]]:
    """The model's top-1 tokens at the answer positions of every locality probe, by case id (the reference)."""
    prompts, answers = _probe_rows(requests)
    scores = score_targets(model, tokenizer, prompts, answers, progress="locality reference") if prompts else None
    predictions = iter(scores.predictions if scores else [])
    return {r.case_id: [next(predictions).tolist() for _ in r.locality] for r in requests}


def score_requests(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    family: str,
    reference: dict[str, list[list[int]]],
    averaging: TokenAveraging = "case",
) -> dict[str, torch.Tensor]:
    """Scores of every probe of ``requests`` as flat tensors for :class:`HitRate` (keys: module docstring).

    CounterFact comparisons give one bool per probe. Token accuracies (``token`` family, and ``locality`` in both) give
    one accuracy per probe with ``averaging="case"``, or one bool per token with ``"pooled"``.
    """
    rewrite = [(r.text, r) for r in requests]
    rephrase = [(p, r) for r in requests for p in r.rephrase_prompts]
    hits: dict[str, torch.Tensor] = {}
    for name, items in (("efficacy", rewrite), ("generalization", rephrase)):
        if not items:
            continue
        prompts = [p for p, _ in items]
        new = score_targets(model, tokenizer, prompts, [r.target_new for _, r in items])
        if family == "counterfact":
            true = score_targets(model, tokenizer, prompts, [r.target_true or "" for _, r in items])
            hits[name] = new.nll < true.nll
        else:
            hits[name] = token_hits(new.correct, averaging)
    prompts, answers = _probe_rows(requests)
    if prompts:
        scores = score_targets(model, tokenizer, prompts, answers)
        expected = [torch.tensor(ref) for r in requests for ref in reference[r.case_id]]
        hits["locality"] = token_hits([p == e for p, e in zip(scores.predictions, expected, strict=True)], averaging)
        if family == "counterfact":
            owners = [r for r in requests for _ in r.locality]
            neighbour = torch.tensor([a == r.target_true for a, r in zip(answers, owners, strict=True)])
            if neighbour.any():
                idx = neighbour.nonzero()[:, 0].tolist()
                flip = score_targets(model, tokenizer, [prompts[i] for i in idx], [owners[i].target_new for i in idx])
                hits["specificity"] = scores.nll[neighbour] < flip.nll
        else:
            gold_prompts = [p.gold_prompt or p.prompt for r in requests for p in r.locality]
            gold = scores if gold_prompts == prompts else score_targets(model, tokenizer, gold_prompts, answers)
            hits["specificity"] = token_hits(gold.correct, averaging)
    return hits


# -- fluency (ROME's generation entropy) ----------------------------------------------------------------------------
# Words and punctuation as separate tokens. ROME uses nltk.word_tokenize, which also splits clitics ("don't" ->
# "do", "n't") and keeps abbreviations' periods; this regex does neither, which only matters on such words.
_WORD = re.compile(r"\w+|[^\w\s]")


def word_tokens(text: str) -> list[str]:
    """Words and punctuation marks of ``text``, the units ROME counts n-grams of (a regex, not nltk).

    Example:
        >>> word_tokens("Paris, the capital.")
        ['Paris', ',', 'the', 'capital', '.']
    """
    return _WORD.findall(text)


def ngram_entropy(tokens: Sequence[str], n: int) -> float:
    """Entropy in bits of the frequency distribution of the ``n``-grams of ``tokens`` (0 when there are none).

    Example (bigrams ``(a, b)`` twice and ``(b, a)`` once: ``log2(3) - 2/3``):
        >>> round(ngram_entropy(["a", "b", "a", "b"], 2), 12)
        0.918295834054
        >>> ngram_entropy(["a", "b"], 3)
        0.0
    """
    counts = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    total = sum(counts.values())
    return sum((c / total * math.log2(total / c) for c in counts.values()), 0.0)


def weighted_ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME's fluency of one text (``compute_n_gram_entropy``): the arithmetic mean over ``n`` of
    ``weight_n * entropy_n`` of its word n-grams. Repetitive text, the failure mode of over-edited models, scores low.

    Example (``a b c``: two distinct bigrams, 1 bit; one trigram, 0 bits; ``(2/3 * 1 + 4/3 * 0) / 2``):
        >>> weighted_ngram_entropy("a b c")
        0.3333333333333333
    """
    tokens = word_tokens(text)
    parts = [w * ngram_entropy(tokens, n) for n, w in zip(ns, weights, strict=True)]
    return sum(parts) / len(parts)


@contextlib.contextmanager
def _seeded(device: torch.device, seed: int) -> Iterator[None]:
    """Seed the RNG that samples on ``device`` and restore it (and the CPU's) afterwards: the run's random stream
    does not depend on whether fluency was measured."""
    cuda = device.type == "cuda"
    index = (device.index if device.index is not None else torch.cuda.current_device()) if cuda else None
    with torch.random.fork_rng(devices=[index] if cuda else []):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


@torch.no_grad()
def generate_texts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_length: int = 100,
    sampling: Sampling = "top5",
    seed: int = 0,
    batch_size: int = 32,
) -> list[str]:
    """Prompt + continuation of every prompt, ``max_length`` tokens in all, as ROME's ``generate_fast``.

    ROME counts ``max_out_len`` over prompt and generated tokens of each row, samples from the top 5 tokens and does
    not stop at end-of-sequence (it drops ``<|endoftext|>`` from the text); its texts keep the prompt and are NFKD
    normalised with blank lines joined. ``sampling="greedy"`` takes the argmax instead. Rows are left-padded so each
    continues its own text; sampling is seeded without touching the global random state.
    """
    if sampling == "top5":
        options = dict(do_sample=True, top_k=5, top_p=1.0, temperature=1.0)
    elif sampling == "greedy":
        options = dict(do_sample=False, num_beams=1)
    else:
        raise ValueError(f"fluency_sampling must be 'top5' or 'greedy', got {sampling!r}")
    texts = []
    with _seeded(model.device, seed):
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(
                list(prompts[start : start + batch_size]), return_tensors="pt", padding=True, padding_side="left"
            ).to(model.device)
            width = batch["input_ids"].shape[1]
            lengths = batch["attention_mask"].sum(1).tolist()
            budgets = [max(0, max_length - n) for n in lengths]  # new tokens of each row
            out = batch["input_ids"]
            if max(budgets) > 0:
                # One run for the longest budget; rows with longer prompts are cut to their own budget below (the
                # tokens after it never influence the ones before).
                out = model.generate(
                    **batch,
                    max_new_tokens=max(budgets),
                    eos_token_id=None,
                    pad_token_id=tokenizer.pad_token_id,
                    **options,
                )
            for row, n, budget in zip(out.tolist(), lengths, budgets, strict=True):
                text = tokenizer.decode(row[width - n : width + budget], skip_special_tokens=True)
                texts.append(unicodedata.normalize("NFKD", text).replace("\n\n", " "))
    return texts


def fluency_scores(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    max_length: int = 100,
    sampling: Sampling = "top5",
    seed: int = 0,
) -> torch.Tensor:
    """ROME's fluency of every request that has generation prompts: the mean :func:`weighted_ngram_entropy` of one
    generation per prompt, ``(n_requests_with_prompts,)``; the reported value is the mean over records."""
    with_prompts = [r for r in requests if r.generation_prompts]
    owned = [(i, p) for i, r in enumerate(with_prompts) for p in r.generation_prompts]
    if not owned:
        return torch.empty(0)
    texts = generate_texts(model, tokenizer, [p for _, p in owned], max_length, sampling, seed)
    entropies = torch.tensor([weighted_ngram_entropy(t) for t in texts], dtype=torch.float64)
    return average_per_case(entropies, torch.tensor([i for i, _ in owned]))
