"""``RoutingMonitor``: how WISE's router treats the evaluation inputs (DESIGN.md section 6).

At every evaluation, the routing scores of the edited prompts, their paraphrases and the unrelated (locality) prompts
relative to the threshold, and the share of each that the side memory answers; with several memories (WISE-Retrieve,
or a merged memory beside the working one), the share of edits and paraphrases answered by the memory that learned
them.
"""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from editing.methods.wise import WISE
from editing.router import choose_memory


class RoutingMonitor(Callback):
    """Logs how WISE routes the evaluation inputs: for ``edit`` (edited prompt + new target), ``paraphrase`` and
    ``unrelated`` (locality prompt + answer) rows, the 10/50/90% quantiles of ``score / threshold`` of the best
    memory (> 1 routes to the side memory) and the share routed, as ``routing/<kind>/...``; plus the lowest threshold.
    With more than one answering memory, ``routing/edit/own_memory`` and ``routing/paraphrase/own_memory``: the share
    routed to the memory that holds the edit, which tells a retrieval miss from a memory that forgot.
    """

    QUANTILES = (0.1, 0.5, 0.9)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        WISE.of(pl_module, type(self).__name__)

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        method = WISE.of(pl_module, type(self).__name__)
        done = int(pl_module.edits_done)
        requests = pl_module.stream.requests[:done]
        if not requests or not method.memory.answering():
            return
        holder = {text: j for j, texts in enumerate(method.memory.memory_texts()) for text in texts}
        edit_owner = [holder.get((r.text, r.target_new), -2) for r in requests]  # -2: held by no answering memory
        kinds = {
            "edit": ([(r.text, r.target_new) for r in requests], edit_owner),
            "paraphrase": (
                [(p, r.target_new) for r in requests for p in r.rephrase_prompts],
                [j for r, j in zip(requests, edit_owner, strict=True) for _ in r.rephrase_prompts],
            ),
            "unrelated": ([(p.prompt, p.answer) for r in requests for p in r.locality], None),
        }
        values = {}
        for kind, (texts, owners) in kinds.items():
            if not texts:
                continue
            scores, thresholds = method.scores_of(texts)
            scores = scores.cpu()
            ratio = (scores / thresholds[:, None]).amax(0)
            for q, value in zip(self.QUANTILES, torch.quantile(ratio, torch.tensor(self.QUANTILES)), strict=True):
                values[f"routing/{kind}/q{int(q * 100)}"] = float(value)
            values[f"routing/{kind}/routed"] = float((ratio > 1).float().mean())
            if owners is not None and len(thresholds) > 1:
                route = choose_memory(scores, thresholds, method.router.retrieval)
                values[f"routing/{kind}/own_memory"] = float((route == torch.tensor(owners)).float().mean())
        values["routing/threshold"] = float(thresholds.min())
        pl_module.log_dict(values)
