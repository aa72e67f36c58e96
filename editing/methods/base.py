"""The method interface and the locate-then-edit base shared by MEMIT, AlphaEdit and LyapLock.

A method is an ``nn.Module``: its state (original weights, statistics handles, queues, replay sums) is buffers, so it
moves with ``.to()`` and is checkpointed with the :class:`~editing.module.EditingModule`. One edit step is two calls:
``prepare(requests)`` in ``training_step`` (targets: the costly gradient part) and ``apply(requests, plan)`` from the
optimizer's ``step`` (the closed-form update).
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from jsonargparse import ArgumentError, ArgumentParser
from jsonargparse.typing import ClosedUnitInterval, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from editing.arguments import check_arguments, plain_config
from editing.corpus import load_corpus
from editing.distributed import gather_columns, gather_lists, share, sum_across
from editing.locate import (
    KeyAveraging,
    KLVariant,
    LayerWalk,
    StopRule,
    TargetResult,
    compute_targets,
    generate_context_templates,
    spread_residual,
)
from editing.models import EditedWeight, default_mlp_layers, precision_runner
from editing.requests import EditRequest
from editing.stats import load_or_collect_second_moments

log = logging.getLogger(__name__)

TargetPrecision = Literal["model", "bfloat16", "float16"]


class EditMethod(nn.Module, ABC):
    """A sequential editing method. Subclasses edit ``model`` in place, one batch of requests per step.

    :meth:`setup` binds the method to the language model and its tokenizer, which it then reads as :attr:`model` and
    :attr:`tokenizer`; subclasses do their own binding (edited weights, statistics, hooks) in :meth:`configure`.

    A method is also data: :func:`method_config` describes it as ``class_path`` + ``init_args`` (what a config or a
    checkpoint holds) and :func:`build_method` rebuilds it from that.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> EditMethod:
        # The caller's arguments, recorded before any __init__ of the hierarchy runs, so that method_config describes
        # the method as it was asked for (not its state after binding, e.g. the layers a model preset filled in).
        method = super().__new__(cls)
        object.__setattr__(method, "_init_call", (args, dict(kwargs)))
        return method

    def __init__(self) -> None:
        super().__init__()
        self.timings: dict[str, float] = {}
        self._bound: tuple[PreTrainedModel, PreTrainedTokenizerBase] | None = None  # a tuple: not a submodule

    @property
    def bound(self) -> bool:
        """Whether :meth:`setup` has bound the method to a model."""
        return self._bound is not None

    def setup(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, model_id: str, cache_dir: Path) -> None:
        """Bind to the model (called once from ``configure_model``, before any checkpoint is restored)."""
        self._bound = (model, tokenizer)
        self.configure(model_id, cache_dir)

    @abstractmethod
    def configure(self, model_id: str, cache_dir: Path) -> None:
        """The method's own binding to :attr:`model`: what it edits, and the state it allocates with its final shapes
        (``model_id`` and ``cache_dir`` key on-disk caches)."""

    @property
    def model(self) -> PreTrainedModel:
        """The bound language model (edited in place; not a submodule of the method, so not in its state)."""
        return self._binding()[0]

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The bound model's tokenizer."""
        return self._binding()[1]

    def _binding(self) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        if self._bound is None:
            raise RuntimeError(f"{type(self).__name__}: not bound to a model yet (call setup first)")
        return self._bound

    @abstractmethod
    def prepare(self, requests: Sequence[EditRequest]) -> object:
        """The gradient-based part of a step (targets); its result is handed to :meth:`apply`."""

    @abstractmethod
    def apply(self, requests: Sequence[EditRequest], plan: object) -> None:
        """The weight update of a step."""

    def edited_weights(self) -> dict[str, EditedWeight]:
        """Weights this method changes, by module name (for monitors, PRUNE and checkpoints)."""
        return {}

    def step_log(self) -> dict[str, float]:
        """Values worth logging after a step (beyond ``timings``), keyed ``stage/name``."""
        return {}

    def export(self, path: str | Path) -> None:
        """Write the edited model as a Hugging Face directory (safetensors, config, tokenizer). A method that edits
        the model's own weights needs nothing else: ``from_pretrained(path)`` loads the edited model. A method whose
        edits live elsewhere (WISE's side memory) overrides this."""
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)


@functools.cache
def _method_parser() -> ArgumentParser:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--method", type=EditMethod)
    return parser


def _class_path(cls: type) -> str:
    """The import path a config names ``cls`` by: the package's re-export (``editing.methods.LyapLock``) if any."""
    package = cls.__module__.rpartition(".")[0]
    if package and getattr(sys.modules.get(package), cls.__qualname__, None) is cls:
        return f"{package}.{cls.__qualname__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def method_config(method: EditMethod) -> dict[str, Any]:
    """``{"class_path": ..., "init_args": {...}}`` of ``method``: every constructor argument (defaults included) as
    plain data, as jsonargparse writes it in a config, so a checkpoint that stores it loads with
    ``torch.load(weights_only=True)`` and :func:`build_method` rebuilds the same method.

    Raises:
        TypeError: the method was given positional arguments that its signature does not name (pass them by name).
    """
    args, kwargs = getattr(method, "_init_call", ((), {}))
    signature = inspect.signature(type(method))
    named = {}
    for name, value in signature.bind_partial(*args, **kwargs).arguments.items():
        kind = signature.parameters[name].kind
        if kind == inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError(f"{type(method).__name__}: pass the arguments by name to describe it as a config")
        elif kind == inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        else:
            named[name] = value
    parser = _method_parser()
    # jsonargparse converts the values it parses in place: parse copies, never the caller's lists
    config = parser.parse_object(
        copy.deepcopy({"method": {"class_path": _class_path(type(method)), "init_args": named}})
    )
    return plain_config(parser, config)["method"]


def build_method(config: dict[str, Any], allow_import: bool = False) -> EditMethod:
    """The method a :func:`method_config` dict (or a config file's ``model.method``) describes, its arguments checked
    as the command line checks them.

    Args:
        config: ``{"class_path": ..., "init_args": {...}}``.
        allow_import: import the module ``class_path`` names if needed. Off for checkpoints, whose contents should not
            choose code to import: their class must already be imported (``editing.methods`` always is).
    """
    class_path = config.get("class_path") if isinstance(config, dict) else None
    if not isinstance(class_path, str):
        raise ValueError(f"method: expected {{'class_path': ..., 'init_args': {{...}}}}, got {config!r}")
    module_name, _, name = class_path.rpartition(".")
    cls = getattr(sys.modules.get(module_name), name, None)
    if not allow_import and not (isinstance(cls, type) and issubclass(cls, EditMethod)):
        raise ValueError(
            f"method: class_path '{class_path}' is not an imported EditMethod subclass; import the module that "
            "defines it before loading"
        )
    parser = _method_parser()
    try:
        parsed = parser.parse_object(copy.deepcopy({"method": config}))  # not converted in place: it may be hparams
    except ArgumentError as err:  # a bad value, named as the command line names it
        raise ValueError(f"method: {err}") from None
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # jsonargparse < 4.49
    return instantiate(parsed).method


class LocateThenEdit(EditMethod):
    """Targets ``z`` at the last edited layer, then a per-layer closed-form solve with residual spreading.

    Subclasses implement :meth:`solve` (one layer's ``Delta``) and may override :meth:`after_layer_update`.

    Args:
        layers: edited blocks (MLP output projections), ascending; ``None`` picks five early-middle blocks.
        mom2_weight: lambda, weight of the preserved-knowledge statistic C0 in the solve.
        target_lr: Adam learning rate of the target shift (MEMIT: 0.5).
        target_steps: maximum optimisation steps per target (MEMIT: 20-25).
        kl_factor: weight of the KL term on ``"{subject} is a"`` (MEMIT: 0.0625).
        weight_decay: weight of ``||delta|| / ||h0||^2`` (MEMIT: 0.5).
        clamp_norm_factor: ``||delta|| <= clamp_norm_factor * ||h0||`` (MEMIT: 0.75).
        stop_rule: when a target stops early: ``loss`` (the releases': its total loss is below ``stop_loss``) or
            ``argmax`` (this project's variant: the new target is the argmax at every token of every template with
            geometric-mean probability ``stop_prob``). Default: the release's (docs/fidelity.md).
        stop_loss: the ``loss`` rule's threshold (MEMIT/AlphaEdit/LyapLock releases: 5e-2).
        stop_prob: the ``argmax`` rule's probability.
        kl_variant: ``release`` (KL(edited || original) at the subject's last token of ``"{subject} is a"``, as the
            releases' ``compute_z``) or ``last_token`` (KL(original || edited) at its last token: this project's
            earlier variant).
        target_precision: dtype of the blocks above the last edited layer and the LM head during the target
            optimisation: ``model`` (the model's own) or ``bfloat16``/``float16`` (a frozen copy: locate-then-edit
            never changes those blocks). Residual stream below, ``h0``, keys, C0 and every solve keep the model's
            precision (float64 solves). Default ``bfloat16``: on 100 CounterFact edits in one step it ran the targets
            1.63x faster with the same metrics to 0.2 points (docs/benchmarks.md).
        key_averaging: ``release`` (keys: the bare prompt weighs 1/2, the generated-prefix templates share 1/2, as the
            releases' ``compute_ks``) or ``flat`` (one mean over every template).
        context_seeds: seed words of the generated context templates (MEMIT: The, Therefore, Because, I, You).
        context_length: tokens per generated context prefix (MEMIT: 10).
        stats_corpus: ``"model"`` (text sampled from the model itself, offline), a ``.txt``/``.jsonl`` file, or
            ``"hf:NAME[:CONFIG]"`` for a Hugging Face dataset available locally.
        stats_tokens: corpus tokens for C0 (MEMIT uses 100k Wikipedia samples; fewer is enough for small models).
        seed: seed of the context templates and of the model-sampled corpus.
    """

    @check_arguments
    def __init__(
        self,
        layers: list[NonNegativeInt] | None = None,
        mom2_weight: PositiveFloat = 15000.0,
        target_lr: PositiveFloat = 0.5,
        target_steps: PositiveInt = 25,
        kl_factor: NonNegativeFloat = 0.0625,
        weight_decay: NonNegativeFloat = 0.5,
        clamp_norm_factor: PositiveFloat = 0.75,
        stop_rule: StopRule = "loss",
        stop_loss: NonNegativeFloat = 5e-2,
        stop_prob: ClosedUnitInterval = 0.95,
        kl_variant: KLVariant = "release",
        target_precision: TargetPrecision = "bfloat16",
        key_averaging: KeyAveraging = "release",
        context_seeds: list[str] | None = None,
        context_length: PositiveInt = 10,
        stats_corpus: str = "model",
        stats_tokens: PositiveInt = 20_000,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if layers is not None and (not layers or sorted(set(layers)) != list(layers)):
            raise ValueError(f"layers: expected a non-empty ascending list of distinct block indices, got {layers}")
        self.layers = layers
        self.mom2_weight = mom2_weight
        self.target_kwargs = dict(
            lr=target_lr,
            steps=target_steps,
            kl_factor=kl_factor,
            weight_decay=weight_decay,
            clamp_norm_factor=clamp_norm_factor,
            stop_rule=stop_rule,
            stop_loss=stop_loss,
            stop_prob=stop_prob,
            kl_variant=kl_variant,
        )
        self.target_precision = target_precision
        self._runner: tuple[PreTrainedModel] | None = None  # a tuple: the copy is neither a submodule nor state
        self.key_averaging = key_averaging
        self.context_seeds = context_seeds if context_seeds is not None else ["The", "Therefore", "Because", "I", "You"]
        self.context_length = context_length
        self.stats_corpus = stats_corpus
        self.stats_tokens = stats_tokens
        self.seed = seed
        self.templates: list[str] = []
        self._weights: dict[str, EditedWeight] = {}
        self._last_targets: TargetResult | None = None

    # -- binding -----------------------------------------------------------------------------------------------
    def configure(self, model_id: str, cache_dir: Path) -> None:
        model, tokenizer = self.model, self.tokenizer
        self.layers = self.layers if self.layers is not None else default_mlp_layers(model)
        self._weights = {w.name: w for w in (EditedWeight(model, layer) for layer in self.layers)}
        for i, w in enumerate(self._weights.values()):
            self.register_buffer(f"w0_{i}", w.get().detach().clone(), persistent=False)
        self.templates = generate_context_templates(
            model, tokenizer, self.context_seeds, self.context_length, self.seed
        )
        texts, corpus_id = load_corpus(self.stats_corpus, model, tokenizer, self.stats_tokens, self.seed, cache_dir)
        c0 = load_or_collect_second_moments(
            model, tokenizer, texts, list(self._weights), model_id, corpus_id, self.stats_tokens, cache_dir
        )
        for i, name in enumerate(self._weights):
            self.register_buffer(f"c0_{i}", c0[name], persistent=False)
        self.setup_state()

    def setup_state(self) -> None:
        """Allocate method state with its final shapes (runs before a checkpoint is restored into it)."""

    def edited_weights(self) -> dict[str, EditedWeight]:
        return self._weights

    def target_runner(self) -> PreTrainedModel | None:
        """The reduced-precision copy that runs the upper blocks of the target optimisation (``None``: the model).

        Made at the first step, after any checkpoint is restored; the blocks it is read for are never edited."""
        if self._runner is None:
            self._runner = (precision_runner(self.model, self.target_precision),)
        return self._runner[0]

    def c0(self, i: int) -> torch.Tensor:
        return getattr(self, f"c0_{i}")

    def w0(self, i: int) -> torch.Tensor:
        return getattr(self, f"w0_{i}")

    # -- one step ----------------------------------------------------------------------------------------------
    def prepare(self, requests: Sequence[EditRequest]) -> TargetResult:
        """The step's targets; in a multi-process run each rank optimises its share and every rank gets them all (the
        targets of a request do not depend on the others of its batch: their losses are summed)."""
        start = time.perf_counter()
        mine = share(requests)
        if mine:
            with torch.enable_grad():
                result = compute_targets(
                    self.model,
                    self.tokenizer,
                    mine,
                    self.layers[-1],
                    self.templates,
                    runner=self.target_runner(),
                    **self.target_kwargs,
                )
        else:  # more ranks than requests
            empty = torch.empty(self.model.config.hidden_size, 0, dtype=self.model.dtype, device=self.model.device)
            result = TargetResult(z=empty, steps=[], prob=[], tokens=0)
        tokens = sum_across(torch.tensor([result.tokens], device=self.model.device))
        result = TargetResult(
            z=gather_columns(result.z, len(requests)),
            steps=gather_lists(result.steps),
            prob=gather_lists(result.prob),
            tokens=int(tokens.item()),
        )
        self.timings = {"targets": time.perf_counter() - start, "keys": 0.0, "solve": 0.0}
        self._last_targets = result
        return result

    def step_log(self) -> dict[str, float]:
        result = self._last_targets
        if result is None:
            return {}
        return {
            "train/target_prob": sum(result.prob) / len(result.prob),
            "train/target_steps": sum(result.steps) / len(result.steps),
            "train/target_tokens": float(result.tokens),
        }

    @torch.no_grad()
    def apply(self, requests: Sequence[EditRequest], plan: TargetResult) -> None:
        z = plan.z.double()
        n, total = len(self.layers), len(requests)
        # each rank walks its share of the requests; keys and residuals are gathered, so every rank solves the same
        mine = share(requests)
        walk = LayerWalk(self.model, self.tokenizer, mine, self.templates, self.key_averaging) if mine else None
        for i, (name, weight) in enumerate(self._weights.items()):
            start = time.perf_counter()
            if walk is not None:
                k_mine, h_mine = walk.keys(self.layers[i], name), walk.output_at_subject(self.layers[-1])
            else:  # more ranks than requests: this rank contributes no columns
                k_mine = weight.get().new_empty(weight.get().shape[1], 0)
                h_mine = weight.get().new_empty(self.model.config.hidden_size, 0)
            keys = gather_columns(k_mine, total).double()  # (d_k, n)
            h = gather_columns(h_mine, total).double()  # (d, n)
            resid = spread_residual(z, h, i, n)  # (d_v, n)
            mid = time.perf_counter()
            delta = self.solve(i, weight.get().double(), keys, resid)
            weight.add(delta)
            self.after_layer_update(i, weight.get().double(), keys)
            self.timings["keys"] += mid - start
            self.timings["solve"] += time.perf_counter() - mid
        self.after_step()

    @abstractmethod
    def solve(self, i: int, W: torch.Tensor, K: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        """``Delta: (d_v, d_k)`` for edited layer ``i`` given its current weight ``W``, keys ``K: (d_k, n)`` and
        residuals ``R: (d_v, n)``, all float64."""

    def after_layer_update(self, i: int, W: torch.Tensor, K: torch.Tensor) -> None:
        """Bookkeeping once layer ``i`` holds its new weight ``W`` (float64)."""

    def after_step(self) -> None:
        """Bookkeeping once every layer of the step is updated."""


def solve_right(B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``B A^-1`` for a square ``A`` without forming the inverse (``A^T X^T = B^T``), in float64."""
    return torch.linalg.solve(A.T, B.T).T
