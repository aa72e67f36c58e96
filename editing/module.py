"""``EditingModule``: the LightningModule that applies a stream of edits, one batch per training step.

``training_step`` computes the method's targets (the gradient part); the update is the optimizer's ``step`` (the
closed-form solve for locate-then-edit methods), so Lightning counts one optimizer step per edit batch and
``max_steps``, ``val_check_interval`` and checkpoint intervals count edit steps. ``validation_step`` scores the
requests edited so far (all of them before the first edit: the unedited baseline).

Checkpoints hold only the edited weights, the method state and the locality reference, not the frozen model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from jsonargparse.typing import PositiveInt
from lightning.pytorch import LightningModule
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from editing.arguments import check_arguments
from editing.cache import default_cache_dir
from editing.data import EditStream, IndexedRequest
from editing.methods.base import EditMethod
from editing.metrics import (
    HitRate,
    MeanScore,
    Sampling,
    TokenAveraging,
    fluency_scores,
    locality_predictions,
    score_requests,
)
from editing.models import EMBEDDED_MODEL, load_model
from editing.requests import EditRequest
from editing.rows import check_lengths

SCORES = ("efficacy", "generalization", "specificity", "locality")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ClosedFormStep(torch.optim.Optimizer):
    """An optimizer whose ``step`` applies the method's update to the requests prepared by the closure."""

    def __init__(self, params: list[nn.Parameter], method: EditMethod) -> None:
        super().__init__(params, {})
        self.method = method

    @torch.no_grad()
    def step(self, closure: Callable[[], tuple[list[EditRequest], object]]) -> None:  # type: ignore[override]
        requests, plan = closure()
        self.method.apply(requests, plan)


class EditingModule(LightningModule):
    """A language model under sequential editing by one method.

    Args:
        method: the editing method (``class_path`` in the config: ``editing.methods.LyapLock``, ``MEMIT``, ...).
        model_name: ``SmolLM2-135M-Instruct`` (embedded, offline), a local directory or a Hugging Face id.
        dtype: parameter dtype of the language model (solves always run in float64).
        cache_dir: converted models and C0 statistics (default ``$EDITING_CACHE`` or ``~/.cache/lifelong-editing``).
        step_metrics: after every edit step, score the step's own requests and log them as ``train/*``.
        token_averaging: how token accuracies (ZsRE efficacy, generalization, specificity; locality in every family)
            are averaged: ``case`` takes each probe's accuracy, then the mean over probes, as the papers' harnesses
            (MEMIT/AlphaEdit ``summarize.py``, EasyEdit) do; ``pooled`` is one ratio over all target tokens.
        fluency: log ``val/fluency``, ROME's generation entropy (weighted bigram/trigram entropy, bits) of one text
            per generation prompt, when the evaluated requests have generation prompts (ROME-layout CounterFact). It
            generates ``fluency_max_length`` tokens per prompt at every validation, the costliest score.
        fluency_max_length: tokens per generated text, prompt included (ROME's ``max_out_len=100``).
        fluency_sampling: ``top5`` samples from the 5 most likely tokens as ROME's ``generate_fast`` (seeded, the
            global random state untouched); ``greedy`` takes the argmax.
        eval_sample: at evaluations during the stream, score a fixed, seeded sample of at most this many of the edits
            made so far (with their paraphrase and locality probes), so the cost of watching retention does not grow
            with the stream; the last evaluation (the stream's end, ``max_steps``, or a ``validate`` run) scores every
            edit. ``None``: every edit at every evaluation.
        eval_seed: seed of that sample (one fixed order of the stream: an edit in the sample stays in it while the
            sample is not full).
        stream: the edit stream the module edits and scores (:meth:`EditDataModule.stream`); the command line links
            it from ``data`` (it is not a hyperparameter); in Python, pass ``data.stream()``.
    """

    @check_arguments
    def __init__(
        self,
        method: EditMethod,
        model_name: str = EMBEDDED_MODEL,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        cache_dir: str | None = None,
        step_metrics: bool = True,
        token_averaging: TokenAveraging = "case",
        fluency: bool = True,
        fluency_max_length: PositiveInt = 100,
        fluency_sampling: Sampling = "top5",
        eval_sample: PositiveInt | None = None,
        eval_seed: int = 0,
        stream: EditStream | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["method", "stream"])
        self.method = method
        self._stream = stream
        self.model_name = model_name
        self.dtype_name = dtype
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.step_metrics = step_metrics
        self.token_averaging = token_averaging
        self.fluency = fluency
        self.fluency_max_length = fluency_max_length
        self.fluency_sampling = fluency_sampling
        if eval_sample is not None and stream is not None and eval_sample > len(stream.requests):
            raise ValueError(
                f"eval_sample: {eval_sample} is larger than the stream ({len(stream.requests)} edits); "
                "use null to score every edit"
            )
        self.eval_sample = eval_sample
        self.eval_seed = eval_seed
        self._ranks: torch.Tensor | None = None  # every edit's place in the seeded sample order
        self._scored_below: int | None = None  # this evaluation scores the edits whose place is below this
        self._scored = 0  # edits scored by this evaluation
        self.automatic_optimization = False
        self.strict_loading = False
        self.model: PreTrainedModel | None = None
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.register_buffer("edits_done", torch.zeros((), dtype=torch.long))
        self.locality_reference: dict[str, list[list[int]]] = {}
        self.val_scores = nn.ModuleDict({**{name: HitRate() for name in SCORES}, "fluency": MeanScore()})

    # -- model -------------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.model, self.tokenizer = load_model(self.model_name, _DTYPES[self.dtype_name], self.cache_dir)
        self.model.to(self.device)
        self.method.setup(self.model, self.tokenizer, self.model_name, self.cache_dir)
        if self._stream is not None:
            check_lengths(
                self.stream.requests, self.tokenizer, self.model.config, getattr(self.method, "templates", [])
            )

    @property
    def stream(self) -> EditStream:
        """The edit stream given at construction (the requests, their metric family and the stream's identity)."""
        if self._stream is None:
            raise ValueError("stream: EditingModule needs the edit stream: EditingModule(..., stream=data.stream())")
        return self._stream

    def forward(self, **inputs: torch.Tensor) -> Any:
        """The edited language model (``input_ids``, ``attention_mask``, ... as for Hugging Face models)."""
        return self.model(**inputs)

    def transfer_batch_to_device(self, batch: list[IndexedRequest], device: torch.device, dataloader_idx: int) -> Any:
        return batch  # requests are text; tensors are made on the model's device when they are encoded

    # -- training: one edit batch per step ---------------------------------------------------------------------
    def training_step(self, batch: list[IndexedRequest], batch_idx: int) -> None:
        requests = [r for _, r in batch]
        self.optimizers().step(closure=lambda: (requests, self.method.prepare(requests)))
        self.edits_done += len(requests)
        values = {f"time/{k}": v for k, v in self.method.timings.items()}
        values.update(self.method.step_log())
        values["edits/total"] = float(self.edits_done)
        if self.step_metrics:
            start = time.perf_counter()
            for name, hits in self._score(requests).items():
                values[f"train/{name}"] = hits.float().mean().item()
            values["time/step_metrics"] = time.perf_counter() - start
        self.log_dict(values, batch_size=len(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [w.parameter for w in self.method.edited_weights().values()]
        # A method that edits no model weight (WISE trains a side memory) still needs one parameter for the optimizer.
        return ClosedFormStep(params or [nn.Parameter(torch.empty(0), requires_grad=False)], self.method)

    # -- evaluation ------------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        self._ensure_reference()

    def on_validation_start(self) -> None:
        self._ensure_reference()
        self._scored_below, self._scored = self._sample_cut(), 0

    def validation_step(self, batch: list[IndexedRequest], batch_idx: int) -> None:
        done = int(self.edits_done)
        requests = [r for i, r in batch if (done == 0 or i < done) and self._in_sample(i)]
        if not requests:
            return
        self._scored += len(requests)
        for name, hits in self._score(requests).items():
            if hits.numel():
                self.val_scores[name].update(hits)
                self.log(f"val/{name}", self.val_scores[name], batch_size=len(requests))
        if self.fluency and any(r.generation_prompts for r in requests):
            # Seeded by batch so that batches do not repeat each other's draws; the same stream gives the same texts.
            scores = fluency_scores(
                self.model, self.tokenizer, requests, self.fluency_max_length, self.fluency_sampling, seed=batch_idx
            )
            self.val_scores["fluency"].update(scores)
            self.log("val/fluency", self.val_scores["fluency"], batch_size=len(scores))

    def on_validation_epoch_end(self) -> None:
        self.log("edits/total", float(self.edits_done))
        self.log("val/scored_edits", float(self._scored))  # the sample's size at this evaluation

    def _sample_cut(self) -> int | None:
        """The place bound of this evaluation's sample: the ``eval_sample`` edits made so far that come first in one
        seeded order of the stream; ``None`` scores every edit (no sample, no more edits than the sample holds, or the
        stream's last evaluation: its end, ``max_steps``, or a ``validate`` run)."""
        done, trainer = int(self.edits_done), self.trainer
        last = (
            trainer.state.fn != TrainerFn.FITTING
            or done >= len(self.stream.requests)
            or 0 < trainer.max_steps <= trainer.global_step
        )
        if self.eval_sample is None or last or done <= self.eval_sample:
            return None
        if self._ranks is None:
            order = torch.randperm(len(self.stream.requests), generator=torch.Generator().manual_seed(self.eval_seed))
            self._ranks = torch.empty_like(order).scatter_(0, order, torch.arange(len(order)))
        return int(self._ranks[:done].kthvalue(self.eval_sample).values) + 1

    def _in_sample(self, index: int) -> bool:
        return self._scored_below is None or int(self._ranks[index]) < self._scored_below

    def _score(self, requests: list[EditRequest]) -> dict[str, torch.Tensor]:
        family = self.stream.metric_family
        return score_requests(
            self.model, self.tokenizer, requests, family, self.locality_reference, self.token_averaging
        )

    def _ensure_reference(self) -> None:
        """Cache the unedited model's locality predictions before the first edit (restored from checkpoints)."""
        missing = [r for r in self.stream.requests if r.case_id not in self.locality_reference]
        if not missing:
            return
        if int(self.edits_done) > 0:
            raise ValueError("locality: the checkpoint has no unedited reference predictions for this stream")
        self.locality_reference.update(locality_predictions(self.model, self.tokenizer, missing))

    # -- checkpoints: edited weights + method state only ---------------------------------------------------------
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        full = super().state_dict(*args, **kwargs)
        edited = {f"model.{name}.weight" for name in self.method.edited_weights()}
        return {k: v for k, v in full.items() if k in edited or not k.startswith("model.")}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["locality_reference"] = self.locality_reference

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.locality_reference = checkpoint.get("locality_reference", {})
