"""``RoutingMonitor``: how WISE's router treats the evaluation inputs (DESIGN.md section 6).

At every evaluation, the routing scores of the edited prompts, their paraphrases and the unrelated (locality) prompts
relative to the threshold, and the share of each that the side memory answers.
"""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from editing.methods.wise import WISE


class RoutingMonitor(Callback):
    """Logs how WISE routes the evaluation inputs: for ``edit`` (edited prompt + new target), ``paraphrase`` and
    ``unrelated`` (locality prompt + answer) rows, the 10/50/90% quantiles of ``score / threshold`` of the best
    memory (> 1 routes to the side memory) and the share routed, as ``routing/<kind>/...``; plus the lowest threshold.
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
        kinds = {
            "edit": [(r.text, r.target_new) for r in requests],
            "paraphrase": [(p, r.target_new) for r in requests for p in r.rephrase_prompts],
            "unrelated": [(p.prompt, p.answer) for r in requests for p in r.locality],
        }
        values = {}
        for kind, texts in kinds.items():
            if not texts:
                continue
            scores, thresholds = method.scores_of(texts)
            ratio = (scores.cpu() / thresholds[:, None]).amax(0)
            for q, value in zip(self.QUANTILES, torch.quantile(ratio, torch.tensor(self.QUANTILES)), strict=True):
                values[f"routing/{kind}/q{int(q * 100)}"] = float(value)
            values[f"routing/{kind}/routed"] = float((ratio > 1).float().mean())
        values["routing/threshold"] = float(thresholds.min())
        pl_module.log_dict(values)
