"""Editing scores: the scoring functions (which probe counts as a hit) and one torchmetrics class that sums hits.

Two families (DESIGN.md section 8):

- ``counterfact``: a probe is a hit when the mean per-token NLL of the expected object is lower than the other's
  (efficacy and generalization: ``target_new`` beats ``target_true``; specificity: on neighbourhood prompts
  ``target_true`` still beats ``target_new``).
- ``token``: teacher-forced top-1 accuracy of every target token (ZsRE reliability and generalization).

Locality in both families is token agreement with the unedited model's predictions on the locality probes (the
reference predictions are taken before the first edit). Scores are ratios of summed counts, never means of means.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torchmetrics import Metric
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from editing.locate import encode_rows, mean_per_row, target_log_probs
from editing.requests import EditRequest


class HitRate(Metric):
    """Fraction of hits over everything seen: ``sum(hits) / count``, reducible across processes.

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
) -> TokenScores:
    """Teacher-force each ``target`` after its ``prompt`` and score every target token, in batches."""
    nll, predictions, correct = [], [], []
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
    predictions = iter(score_targets(model, tokenizer, prompts, answers).predictions if prompts else [])
    return {r.case_id: [next(predictions).tolist() for _ in r.locality] for r in requests}


def score_requests(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    family: str,
    reference: dict[str, list[list[int]]],
) -> dict[str, torch.Tensor]:
    """Hits of every probe of ``requests``: ``efficacy``, ``generalization``, ``locality`` and (CounterFact family,
    neighbourhood probes whose answer is ``target_true``) ``specificity``. Each value is a flat tensor of hits."""
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
            hits[name] = torch.cat(new.correct)
    prompts, answers = _probe_rows(requests)
    if prompts:
        scores = score_targets(model, tokenizer, prompts, answers)
        expected = [torch.tensor(ref) for r in requests for ref in reference[r.case_id]]
        hits["locality"] = torch.cat([p == e for p, e in zip(scores.predictions, expected, strict=True)])
        if family == "counterfact":
            owners = [r for r in requests for _ in r.locality]
            neighbour = torch.tensor([a == r.target_true for a, r in zip(answers, owners, strict=True)])
            if neighbour.any():
                idx = neighbour.nonzero()[:, 0].tolist()
                flip = score_targets(model, tokenizer, [prompts[i] for i in idx], [owners[i].target_new for i in idx])
                hits["specificity"] = scores.nll[neighbour] < flip.nll
    return hits
