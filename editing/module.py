"""``EditingModule``: the LightningModule that applies a stream of edits, one batch per training step.

``training_step`` computes the method's targets (the gradient part); the update is the optimizer's ``step`` (the
closed-form solve for locate-then-edit methods), so Lightning counts one optimizer step per edit batch and
``max_steps``, ``val_check_interval`` and checkpoint intervals count edit steps. ``validation_step`` scores the
requests edited so far (all of them before the first edit: the unedited baseline).

Checkpoints hold only the edited weights, the method state and the locality reference, not the frozen model; the
hyperparameters hold the method as ``class_path`` + ``init_args``, so ``EditingModule.load_from_checkpoint(path)``
rebuilds the edited system (it reloads the frozen model by ``model_name``).
"""

from __future__ import annotations

import time
from argparse import ArgumentError
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from jsonargparse.typing import PositiveInt
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from editing.arguments import check_arguments
from editing.cache import default_cache_dir
from editing.data import EditDataModule, EditStream, IndexedRequest
from editing.distributed import any_across, gather_lists, replicas_agree, share, sum_across
from editing.launch import check_launch
from editing.methods.base import EditMethod, build_method, method_config
from editing.metrics import (
    HitRate,
    MeanScore,
    Sampling,
    TokenAveraging,
    fluency_scores,
    locality_predictions,
    score_requests,
)
from editing.models import DTYPES, EMBEDDED_MODEL, load_model, prepare_model, weights_fingerprint
from editing.requests import EditRequest
from editing.rows import check_lengths

SCORES = ("efficacy", "generalization", "specificity", "locality")
# Efficacy is also reported per fifth of the edits made so far, oldest first (``val/efficacy_by_age/fifth_1`` .. 5,
# once five edits are made): on a long stream it tells old edits lost from new edits written less well.
AGE_GROUPS = 5


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
        method: the editing method (``class_path`` in the config: ``editing.methods.LyapLock``, ``MEMIT``, ...); in
            Python also its ``{"class_path": ..., "init_args": {...}}`` dict, as the hyperparameters store it.
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
        check_replicas: in a multi-process run, compare a checksum of every edited weight and method state across
            the ranks after each edit step and stop at the first difference (one all-reduce per step: a debug check
            that the replicas apply the same update).
        stream: the edit stream the module edits and scores (:meth:`EditDataModule.stream`); the command line links
            it from ``data`` (it is not a hyperparameter); in Python, pass ``data.stream()``, or leave it out and the
            module takes the stream of the data module it first runs with (e.g. after ``load_from_checkpoint``).
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
        check_replicas: bool = False,
        stream: EditStream | None = None,
    ) -> None:
        super().__init__()
        if isinstance(method, dict):  # the hyperparameters of a checkpoint (load_from_checkpoint)
            method = build_method(method)
        self.method = method
        # The hyperparameter is the method as data (class_path + init_args, what the command line's config holds),
        # so that a checkpoint rebuilds it and still loads with torch.load(weights_only=True).
        method = self._method_config(method)  # read by save_hyperparameters from this frame
        self.save_hyperparameters(ignore=["stream"])
        self._stream: EditStream | None = None
        self.model_name = model_name
        self.dtype_name = dtype
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.step_metrics = step_metrics
        self.token_averaging = token_averaging
        self.fluency = fluency
        self.fluency_max_length = fluency_max_length
        self.fluency_sampling = fluency_sampling
        self.eval_sample = eval_sample
        self.eval_seed = eval_seed
        self.check_replicas = check_replicas
        self._ranks: torch.Tensor | None = None  # every edit's place in the seeded sample order
        self._scored_below: int | None = None  # this evaluation scores the edits whose place is below this
        self._scored = 0  # edits scored by this evaluation
        self.automatic_optimization = False
        self.strict_loading = False
        self.model: PreTrainedModel | None = None
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self._model_id: str | None = None  # what keys the on-disk caches: model_name, or a fingerprint (from_model)
        self.register_buffer("edits_done", torch.zeros((), dtype=torch.long))
        self.locality_reference: dict[str, list[list[int]]] = {}
        self.val_scores = nn.ModuleDict({**{name: HitRate() for name in SCORES}, "fluency": MeanScore()})
        self.val_efficacy_by_age = nn.ModuleDict({f"fifth_{g}": HitRate() for g in range(1, AGE_GROUPS + 1)})
        if stream is not None:
            self.stream = stream

    @classmethod
    def from_model(
        cls, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, method: EditMethod, **kwargs: Any
    ) -> EditingModule:
        """A module around a model already in memory (loaded, fine-tuned or converted by the caller), which it edits
        in place (:func:`editing.models.prepare_model` puts it in eval mode with gradients off and right padding).

        The model is not a hyperparameter: ``model_name`` defaults to ``model.name_or_path``, what
        ``load_from_checkpoint`` reloads, and the on-disk caches (C0) are keyed by a fingerprint of the weights, so a
        changed model never reads the statistics of another with the same name.

        Args:
            model, tokenizer: the language model and its tokenizer.
            method: the editing method.
            **kwargs: the other constructor arguments (``stream``, ``step_metrics``, ...).
        """
        kwargs.setdefault("model_name", model.name_or_path or "in-memory")
        kwargs.setdefault("dtype", next((k for k, v in DTYPES.items() if v == model.dtype), "float32"))
        module = cls(method, **kwargs)
        module.model, module.tokenizer = prepare_model(model, tokenizer)
        module._model_id = f"{module.model_name}@{weights_fingerprint(model)}"
        return module

    @staticmethod
    def _method_config(method: object) -> dict[str, Any] | None:
        """The method's ``class_path`` + ``init_args``; ``None`` (with a warning) when it cannot be described."""
        if not isinstance(method, EditMethod):
            return None
        try:
            return method_config(method)
        except (TypeError, ValueError, ArgumentError) as err:
            rank_zero_warn(
                f"EditingModule: the method cannot be stored as a config ({err}); load_from_checkpoint will need "
                "method=... passed by hand"
            )
            return None

    # -- model -------------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is None:
            self.model, self.tokenizer = load_model(self.model_name, DTYPES[self.dtype_name], self.cache_dir)
            # the trainer's device, not self.device: the module has no parameter on it yet, and the method's set-up
            # (templates, C0) runs now, under the strategy's device context
            self.model.to(self.trainer.strategy.root_device if self._trainer is not None else self.device)
        if not self.method.bound:
            self.method.setup(self.model, self.tokenizer, self._model_id or self.model_name, self.cache_dir)
            self._check_stream()

    def _check_stream(self) -> None:
        """Refuse requests the bound model's positions cannot hold, before anything is edited."""
        if self._stream is not None and self.model is not None:
            templates = getattr(self.method, "templates", [])
            check_lengths(self._stream.requests, self.tokenizer, self.model.config, templates)

    @property
    def stream(self) -> EditStream:
        """The edit stream (the requests, their metric family and the stream's identity): given at construction, set
        here, or taken from the data module of the first run."""
        if self._stream is None:
            raise ValueError("stream: EditingModule needs the edit stream: EditingModule(..., stream=data.stream())")
        return self._stream

    @stream.setter
    def stream(self, stream: EditStream) -> None:
        if self.eval_sample is not None and self.eval_sample > len(stream.requests):
            raise ValueError(
                f"eval_sample: {self.eval_sample} is larger than the stream ({len(stream.requests)} edits); "
                "use null to score every edit"
            )
        self._stream = stream
        self._ranks = None  # the sample order is one of this stream
        if isinstance(self.method, EditMethod) and self.method.bound:
            self._check_stream()

    def setup(self, stage: str) -> None:
        check_launch(self.trainer)
        datamodule = getattr(self.trainer, "datamodule", None)
        if self._stream is None and isinstance(datamodule, EditDataModule):
            self.stream = datamodule.stream()
        self._plot_against_edits()

    def _plot_against_edits(self) -> None:
        """Make the number of edits the x axis of every W&B chart (the step axis counts edit steps, which differ from
        edits when ``edits_per_step > 1`` and restart with every ``Editor.edit`` call); W&B takes the last
        ``edits/total`` for a row that lacks it."""
        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.define_metric("edits/total")
                logger.experiment.define_metric("*", step_metric="edits/total", step_sync=True)

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
        if self.check_replicas:
            self._check_replicas()
        values = {f"time/{k}": v for k, v in self.method.timings.items()}
        values.update(self.method.step_log())
        values["edits/total"] = float(self.edits_done)
        if self._stream_ends_here():
            # Lightning evaluates every `val_check_interval` steps only: a stream whose length is not a multiple of it
            # would end without its final evaluation. A stop request makes the fit loop evaluate after this step.
            self.trainer.should_stop = True
        if self.step_metrics:
            start = time.perf_counter()
            for name, hits in self._score(requests).items():
                values[f"train/{name}"] = hits.float().mean().item()
            values["time/step_metrics"] = time.perf_counter() - start
        self.log_dict(values, batch_size=len(batch))

    def _stream_ends_here(self) -> bool:
        """The step just taken is the fit's last: the stream is used up, or ``max_steps`` is reached."""
        trainer = self.trainer
        return int(self.edits_done) >= len(self.stream.requests) or 0 < trainer.max_steps <= trainer.global_step

    def _check_replicas(self) -> None:
        state = [*(w.get() for w in self.method.edited_weights().values()), *self.method.buffers()]
        if not replicas_agree(state):
            raise RuntimeError(
                f"check_replicas: the ranks' edited weights or method state differ after {int(self.edits_done)} edits"
            )

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
        every = done == 0 or self.stream.scored == "all"
        # every rank reads the whole batch and scores its share of it (no request twice)
        mine = share([(i, r) for i, r in batch if (every or i < done) and self._in_sample(i)])
        if not mine:
            return
        requests = [r for _, r in mine]
        self._scored += len(requests)
        for name, hits in self._score(requests).items():
            if hits.numel():
                self.val_scores[name].update(hits)
            if name == "efficacy" and done >= AGE_GROUPS and hits.numel() == len(requests):  # one per request
                self._update_by_age([i for i, _ in mine], hits, done)
        if self.fluency and any(r.generation_prompts for r in requests):
            # Seeded by batch so that batches do not repeat each other's draws; the same stream gives the same texts.
            scores = fluency_scores(
                self.model, self.tokenizer, requests, self.fluency_max_length, self.fluency_sampling, seed=batch_idx
            )
            self.val_scores["fluency"].update(scores)

    def _update_by_age(self, indices: list[int], hits: torch.Tensor, done: int) -> None:
        """Efficacy of the edited requests at stream places ``indices``, split by the fifth of the ``done`` edits so
        far that each falls in (requests not edited yet, scored by ``validate`` of a whole stream, are left out).

        Every group is updated, an empty one with nothing, so that every evaluation logs all five: a group left out
        would keep an earlier evaluation's value in the logged metrics; an empty one reads NaN.
        """
        group = torch.tensor([i * AGE_GROUPS // done if i < done else -1 for i in indices], device=hits.device)
        for g, metric in enumerate(self.val_efficacy_by_age.values()):
            metric.update(hits[group == g])

    def on_validation_epoch_end(self) -> None:
        # Computed here on every rank, not logged per batch: a rank whose shares held no probe of some kind must
        # still join that score's all-reduce (torchmetrics syncs the sums in compute); the values are then equal on
        # every rank (sync_dist only keeps Lightning from warning about epoch-level values in a distributed run).
        scores = {**self.val_scores, **{f"efficacy_by_age/{k}": m for k, m in self.val_efficacy_by_age.items()}}
        for name, metric in scores.items():
            if any_across(metric.update_count > 0):
                self.log(f"val/{name}", metric.compute(), sync_dist=True)
            metric.reset()
        self.log("edits/total", float(self.edits_done), sync_dist=True)
        scored = sum_across(torch.tensor(float(self._scored), dtype=torch.float64, device=self.edits_done.device))
        self.log("val/scored_edits", float(scored), sync_dist=True)  # the sample's size at this evaluation

    def _sample_cut(self) -> int | None:
        """The place bound of this evaluation's sample: the ``eval_sample`` edits made so far that come first in one
        seeded order of the stream; ``None`` scores every edit (no sample, no more edits than the sample holds, or the
        stream's last evaluation: its end, ``max_steps``, or a ``validate`` run)."""
        done = int(self.edits_done)
        last = self.trainer.state.fn != TrainerFn.FITTING or self.stream.scored == "all" or self._stream_ends_here()
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
        """Cache the locality predictions of the model as it is before a request is edited (restored from
        checkpoints): the unedited model's for the whole stream before the first edit. A stream that a later run
        continues (``start > 0``, consecutive ``Editor.edit`` calls) gets them for its new requests from the model as
        it is before that run, so their locality is measured against the model with the earlier edits in it; the
        same holds for requests an ``all`` evaluation scores before they are edited. A request already edited without
        a reference has none to get."""
        stream = self.stream
        missing = [r for r in stream.requests if r.case_id not in self.locality_reference]
        if not missing:
            return
        edited = {r.case_id for r in stream.requests[: int(self.edits_done)]} if stream.scored == "edited" else set()
        if any(r.case_id in edited for r in missing):
            raise ValueError("locality: the checkpoint has no unedited reference predictions for this stream")
        mine = share(missing)  # each rank predicts its share, every rank keeps all
        predicted = locality_predictions(self.model, self.tokenizer, mine) if mine else {}
        self.locality_reference.update(gather_lists(list(predicted.items())))

    # -- checkpoints: edited weights + method state only ---------------------------------------------------------
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        full = super().state_dict(*args, **kwargs)
        edited = {f"model.{name}.weight" for name in self.method.edited_weights()}
        return {k: v for k, v in full.items() if k in edited or not k.startswith("model.")}

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True, assign: bool = False) -> Any:
        """As ``nn.Module.load_state_dict``, except that the frozen model's weights are not missing: a checkpoint never
        holds them (the model is reloaded by name), so only an absent edited weight or method state is reported."""
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        edited = {f"model.{name}.weight" for name in self.method.edited_weights()}
        missing = [k for k in result.missing_keys if k in edited or not k.startswith("model.")]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(
                f"EditingModule: checkpoint state missing {missing}, unexpected {result.unexpected_keys}"
            )
        return result._replace(missing_keys=missing)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["locality_reference"] = self.locality_reference

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.locality_reference = checkpoint.get("locality_reference", {})
