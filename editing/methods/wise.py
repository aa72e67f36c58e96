"""WISE: lifelong editing in a side memory with an activation router (Wang et al., 2024, arXiv 2405.14768).

The main weights stay frozen. Edits train a side memory (a copy of one mid-to-late FFN down projection, kept as its
task vector, :mod:`editing.side_memory`; :mod:`editing.router` decides per input whether it answers) through a
random gradient mask of the current knowledge shard, with two losses: the target cross entropy over the edit prompt
written behind model-generated prefixes, and a margin loss that makes the memory's activation score high on the edit
and low on an irrelevant sentence (the paper's alpha, beta and gamma are ``irrelevant_margin``, ``edit_margin`` and
``gap_margin``):

    max(0, s(x_i) - alpha) + max(0, beta - s(x_e)) + max(0, gamma - (s(x_e) - s(x_i)))

The task vector is clamped to ``[-norm_constraint, norm_constraint]`` elementwise. Shard saves, TIES merges and
WISE-Retrieve's sealed memories are scheduled by :class:`callbacks.WiseMemory`.

Speed (DESIGN.md section 9): nothing below the side-memory block depends on the memory, so the block's input and the
projection's input are captured once per edit without gradient; each iteration runs only the blocks from the
side-memory block up, the LM head only at target positions, and all rows of all requests of a step in one batch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, restricted_number_type
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from editing.arguments import PositiveFraction, check_arguments
from editing.corpus import SAMPLE_SEEDS, file_texts
from editing.forward import blocks_from, capture, log_softmax_at, token_log_probs
from editing.locate import generate_context_templates
from editing.methods.base import EditMethod, TargetPrecision
from editing.models import architecture_of, precision_runner, sample_text
from editing.requests import EditRequest
from editing.router import RetrievalRule, Router
from editing.rows import EncodedRows, encode_rows, mean_per_row
from editing.side_memory import MergeStyle, SideMemory
from editing.wise_export import export_edited

log = logging.getLogger(__name__)

PREFIX_SEEDS = ("The", "Therefore", "Because", "I", "You", "It", "In", "She", "We", "This")
QUESTION_SEEDS = ("Who", "What", "When", "Where", "Which", "How")
Texts = list[tuple[str, str]]
Score = Literal["paper", "centred"]
PrefixCount = restricted_number_type("PrefixCount", int, [(">=", 0), ("<=", len(PREFIX_SEEDS))])
DEFAULT_SLACK = 0.88  # the authors' threshold factor for every model they set, except Llama-3-8B


@dataclass(frozen=True)
class WisePreset:
    """The side-memory block, threshold slack and routing score for one model, recognised by its config: the
    authors' settings, or this project's measured ones where the authors give none.

    Attributes:
        name: the model, for the log line.
        model_type, n_blocks, hidden_size: ``config.model_type``, ``num_hidden_layers``, ``hidden_size``.
        vocab_size: ``config.vocab_size`` where two models share the rest (Llama-2-7B and Llama-3-8B); ``None``: any.
        block: the block whose MLP down projection holds the side memory.
        slack: threshold factor.
        score: the routing score (``paper`` or this project's ``centred``).
        source: whose setting it is, for the log line.
    """

    name: str
    model_type: str
    n_blocks: int
    hidden_size: int
    vocab_size: int | None
    block: int
    slack: float
    score: Score = "paper"
    source: str = "the authors' setting"

    def matches(self, config: PretrainedConfig) -> bool:
        return (
            config.model_type == self.model_type
            and getattr(config, "num_hidden_layers", None) == self.n_blocks
            and getattr(config, "hidden_size", None) == self.hidden_size
            and (self.vocab_size is None or getattr(config, "vocab_size", None) == self.vocab_size)
        )


# DESIGN.md section 6: the authors' per-model settings (the release's hparams/WISE/*.yaml: inner_params, act_ratio),
# and SmolLM2-135M's, measured here on ZsRE (docs/wise.md, "The SmolLM2 preset").
WISE_PRESETS: tuple[WisePreset, ...] = (
    WisePreset("Llama-2-7B", "llama", 32, 4096, 32000, block=27, slack=0.88),
    WisePreset("Llama-3-8B", "llama", 32, 4096, 128256, block=29, slack=0.5),
    WisePreset("Qwen2.5-7B", "qwen2", 28, 3584, None, block=23, slack=0.88),
    WisePreset(
        "SmolLM2-135M", "llama", 30, 576, 49152, block=4, slack=0.8, score="centred", source="measured in docs/wise.md"
    ),
)


def wise_preset(config: PretrainedConfig) -> WisePreset | None:
    """The authors' WISE setting for the model of ``config``, or ``None`` when they give none."""
    return next((preset for preset in WISE_PRESETS if preset.matches(config)), None)


def _pool_from_file(path: Path) -> list[str]:
    """Irrelevant sentences from a ``.txt`` (one per line), ``.json`` or ``.jsonl`` file (``text``, or ZsRE's
    ``loc`` + ``loc_ans``)."""
    if path.suffix == ".txt":
        return file_texts(path)
    if path.suffix == ".json":
        records = json.loads(path.read_text())
    elif path.suffix == ".jsonl":
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        raise ValueError(f"irrelevant_pool: expected 'model', 'locality' or a .txt/.json/.jsonl file, got '{path}'")
    texts = []
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"irrelevant_pool: {path.name}: record {i} is not an object")
        if "text" in record:
            texts.append(str(record["text"]).strip())
        elif "loc" in record:
            texts.append(f"{str(record['loc']).strip()} {str(record.get('loc_ans', '')).strip()}".strip())
        else:
            raise ValueError(f"irrelevant_pool: {path.name}: record {i} has neither field 'text' nor 'loc'")
    return [t for t in texts if t]


def _hold_out(pool: list[str], size: int, seed: int) -> tuple[list[str], list[str]]:
    """``(trained, held_out)``: ``size`` sentences of a file pool (at most half of it), drawn with ``seed``, that the
    memory never trains on, so that ``threshold_quantile`` measures unrelated inputs of the pool's own kind."""
    held = set(random.Random(seed).sample(range(len(pool)), min(size, len(pool) // 2)))
    return [t for i, t in enumerate(pool) if i not in held], [t for i, t in enumerate(pool) if i in held]


def _word_spans(sentences: Sequence[str]) -> list[str]:
    """The distinct one- and two-word spans of ``sentences`` (punctuation stripped), stand-ins for a subject."""
    spans: dict[str, None] = {}
    for sentence in sentences:
        words = [w.strip(".,;:!?\"'()[]{}") for w in sentence.split()]
        words = [w for w in words if w]
        for i, word in enumerate(words):
            spans[word] = None
            if i + 1 < len(words):
                spans[f"{word} {words[i + 1]}"] = None
    return list(spans)


@dataclass
class EditRows:
    """One step's rows and the activations below the side memory, captured once without gradient.

    Attributes:
        rows: every request written behind each prefix (and bare), followed by ``target_new``; then the rehearsed
            earlier edits of the memory (``rehearse``), bare; then the ``kept`` subject-swapped prompts (``swap_kl``),
            without a target.
        owner: ``(E,)`` request index of each of the first ``E`` rows, those of this step's requests (the routing
            margins concern them; the rehearsed rows only add cross entropy).
        hidden: ``(B, T, d)`` input of the side-memory block.
        a: ``(B, T, d_in)`` input of the side-memory projection.
        a_irr, irr_mask: the same for the irrelevant sentences, and their attention mask.
        irr_owner: request index of each irrelevant sentence (-1: a replayed edit, irrelevant to every request).
        kept: how many trailing rows are subject-swapped prompts whose next-token distribution the memory keeps.
    """

    rows: EncodedRows
    owner: torch.Tensor
    hidden: torch.Tensor
    a: torch.Tensor
    a_irr: torch.Tensor
    irr_mask: torch.Tensor
    irr_owner: torch.Tensor
    kept: int = 0

    @property
    def edit_rows(self) -> int:
        """How many leading rows are this step's requests (the rest are rehearsed edits)."""
        return len(self.owner)


class WISE(EditMethod):
    """WISE side-memory editing. Defaults: the authors' Llama-2-7B settings (DESIGN.md section 6; the release's
    ``hparams/WISE/llama-7b.yaml``), and the release's behaviour where the paper is silent (each such argument says
    so); this project's variants are named switches.

    Args:
        module: the side-memory projection: a block index (its MLP output projection), a module path
            (``model.layers.22.mlp.down_proj``), or ``None``: the preset's block for the models of
            :data:`WISE_PRESETS` (the authors': Llama-2-7B 27, Llama-3-8B 29, Qwen2.5-7B 23; measured here:
            SmolLM2-135M 4), else the block at three quarters of the depth (logged).
        lr: SGD learning rate on the side memory (1.0).
        steps: maximum iterations per edit step (70).
        stop_loss, stop_flatness: stop an edit step once the total loss is at most ``stop_loss`` (0.02) and moved at
            most ``stop_flatness`` (1e-4) since the previous iteration (the paper stops on a low, flat loss; the
            numbers are the release's, whose check lags one iteration: it compares the two losses before the
            current one, here the current and the previous).
        stop_on_argmax: also stop once the new target is the argmax at every target token of every row and every
            edit row meets ``edit_margin`` and ``gap_margin`` (this project's early stop; off by default, as in the
            paper and the release).
        norm_constraint: elementwise bound on ``W' - W`` (1.0).
        weight_decay: SGD weight decay (the release's 1e-5; the paper is silent). The release optimises the whole
            copy ``W'`` with torch's SGD, whose decay acts inside the step after the gradient mask, so it pulls
            ``W' = W + tau`` toward 0 on every entry, masked or not: here the step adds
            ``weight_decay * (W + tau)`` to the masked gradient of ``tau``. 0: only masked entries move.
        mask_density: fraction of entries a shard's gradient mask lets learn (0.2).
        irrelevant_margin: the paper's alpha (5): irrelevant sentences should score at most this.
        edit_margin: the paper's beta (20): edit rows should score at least this.
        gap_margin: the paper's gamma (10): edit rows should score this much above their irrelevant sentence.
        margin_average: how each margin (hinge) term is averaged: ``positive``, over its positive entries only (0
            when none is; the release), or ``all``, over every entry (this project's variant).
        slack: threshold = ``slack *`` the lowest routing score of the memory's edits; ``None``: the preset's value
            for the models of :data:`WISE_PRESETS` (the authors': 0.5 for Llama-3-8B; measured here: 0.8 for
            SmolLM2-135M), else 0.88.
        ties_density: fraction of each task vector's largest entries kept by TIES' trim step when shards merge
            (0.53).
        merge_style: how WISE-Merge carries its merged memory over (see :class:`~editing.side_memory.SideMemory`):
            ``release`` (the authors' release: every save and merge resets the working memory to ``W``, merges weigh
            the new shards 0.4 and the previous merged memory 0.6, and the router picks between the merged and the
            working memory) or ``continue`` (this project's variant: new shards start from the merged memory).
        prefixes, prefix_length: model-generated prefixes the edit is written behind (10 of 10 tokens; at most 10, one
            per seed word of :data:`PREFIX_SEEDS`), plus the bare prompt.
        irrelevant_pool: where the irrelevant sentence of each edit comes from: ``model`` (sentences sampled from the
            unedited model, offline), ``locality`` (the request's own locality probes; note that they are also the
            evaluation's locality probes), or a ``.txt``/``.json``/``.jsonl`` file (e.g. ZsRE training records, whose
            ``loc`` questions the paper uses).
        pool_size: sentences sampled for ``irrelevant_pool: model``.
        irrelevant_per_edit: irrelevant sentences drawn per edit (the paper: one), each kept below
            ``irrelevant_margin`` and ``gap_margin`` under the edit. They enter training through their activations at
            the projection only (captured once per step, no pass through the model), so more of them cost almost
            nothing per iteration (this project's extension). On SmolLM2, 16 lowered the quantile threshold but left
            the edits less learned within ``steps`` (ZsRE T = 25: reliability 0.773 against 0.987, docs/wise.md).
        pool_questions: every second model-sampled sentence starts from a question word (:data:`QUESTION_SEEDS`),
            so the pool and the centre of ``score: centred`` also hold questions, as a chat model's unrelated inputs
            often are (this project's extension; off: every sentence starts from a word of ``SAMPLE_SEEDS``).
        replay: WISE-Retrieve: per step, this many edits of sealed memories join the irrelevant sentences, so a new
            memory stays quiet on old edits and retrieval picks the memory that holds them.
        retrieval: which of several memories above their thresholds answers: ``score`` (the paper's: the highest
            routing score) or ``ratio`` (this project's extension: the highest score relative to the memory's own
            threshold; at ZsRE T = 100 in memories of 25 it answered 97% of the edits from the memory that learned
            them, against 79%, docs/wise.md).
        long_input_max: inputs longer than this many tokens are scored by their maximum token score (the release;
            0: every input, so a row scores by its most distinctive token, e.g. the subject).
        score: ``paper`` (``|| a tau^T ||`` of the projection's inputs) or ``centred`` (this project's extension, not
            evaluated by the paper: the inputs minus their mean over the tokens of ``pool_size`` sentences sampled
            from the unedited model, so the component every sentence shares does not count towards routing);
            ``None``: the preset's (:data:`WISE_PRESETS`; SmolLM2-135M: ``centred``), else ``paper``.
        subject_swaps: per edit, this many more irrelevant rows: the edit's own prompt with its subject replaced by
            a one- or two-word span of a model-sampled sentence, followed by the new target (this project's
            extension, not in the paper), so the memory cannot route on the template and answer an edit shares with
            its neighbourhood ("The capital of Spain is Madrid" beside the edit "The capital of France is Madrid").
        swap_kl: weight of a term that keeps, under the memory, the unedited model's next-token distribution at the
            end of each subject-swapped prompt (``KL(unedited || memory)``, batch mean; this project's extension, not
            in the paper; needs ``subject_swaps``). Where routing cannot tell an edit's neighbourhood from the edit
            (the same template around another subject), the memory itself must then answer the template by its
            subject, as a locate-then-edit update keyed on the subject does. 0: the paper's training. Measured on
            the built-in set (T = 30): no better than the swaps alone (docs/wise.md, session 19).
        rehearse: per step, this many earlier edits that the task vector being trained holds (the current shard's,
            and the merged memory's under ``merge_style: continue``; bare prompt and target, drawn at random) join the
            step's cross entropy (this project's extension, not in the paper, against the forgetting
            measured inside one memory: later edits overwrite earlier ones, docs/wise.md). 0: the paper's training.
        train_precision: dtype of the frozen model during the memory's SGD: ``model`` (its own) or
            ``bfloat16``/``float16`` (a frozen copy made at set-up, as WISE never changes the main weights; this
            project's, for speed: a bfloat16 matmul runs several times faster than float32 on AMX CPUs and tensor
            cores). The task vector, its gradient, the captured activations, routing scores and thresholds keep
            float32; evaluation and routing always run the model itself.
        threshold_quantile: a memory's threshold is at least this quantile of its routing scores on ``pool_size``
            unrelated sentences it is never trained on, recomputed whenever the memories change (this project's
            extension, not in the paper: the threshold follows the unrelated scores as they grow with the memory,
            instead of only the lowest edit score). The sentences are of the irrelevant pool's kind: for a file
            pool, ``pool_size`` of its sentences (at most half) held out of training; for ``model`` and
            ``locality``, sentences sampled from the unedited model apart from the pool. (Model-sampled sentences
            beside a file pool of questions sat above the edits' scores: nothing trained them down, docs/wise.md.)
            ``None``: the paper's ``slack *`` lowest edit score alone.
        seed: seed of prefixes, pool sample, pool choice, shard masks, replay and rehearsal.
    """

    @check_arguments
    def __init__(
        self,
        module: int | str | None = None,
        lr: PositiveFloat = 1.0,
        steps: PositiveInt = 70,
        stop_loss: NonNegativeFloat = 0.02,
        stop_flatness: NonNegativeFloat = 1e-4,
        stop_on_argmax: bool = False,
        norm_constraint: PositiveFloat = 1.0,
        weight_decay: NonNegativeFloat = 1e-5,
        mask_density: PositiveFraction = 0.2,
        irrelevant_margin: float = 5.0,
        edit_margin: float = 20.0,
        gap_margin: float = 10.0,
        margin_average: Literal["positive", "all"] = "positive",
        slack: PositiveFraction | None = None,
        ties_density: PositiveFraction = 0.53,
        merge_style: MergeStyle = "release",
        prefixes: PrefixCount = 10,
        prefix_length: PositiveInt = 10,
        irrelevant_pool: str = "model",
        pool_size: PositiveInt = 100,
        irrelevant_per_edit: PositiveInt = 1,
        pool_questions: bool = False,
        replay: NonNegativeInt = 0,
        retrieval: RetrievalRule = "score",
        long_input_max: NonNegativeInt | None = 100,
        score: Score | None = None,
        subject_swaps: NonNegativeInt = 0,
        swap_kl: NonNegativeFloat = 0.0,
        rehearse: NonNegativeInt = 0,
        threshold_quantile: PositiveFraction | None = None,
        train_precision: TargetPrecision = "model",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if swap_kl and not subject_swaps:
            raise ValueError("swap_kl: keeps the outputs of the subject-swapped prompts; set subject_swaps above 0")
        self.pool: list[str] = []  # irrelevant sentences: read from the file here, sampled in setup for "model"
        if irrelevant_pool not in ("model", "locality"):
            path = Path(irrelevant_pool).expanduser()
            if not path.is_file():
                raise ValueError(f"irrelevant_pool: file '{irrelevant_pool}' does not exist")
            self.pool = _pool_from_file(path)  # a bad file fails here, before any model is loaded
            if not self.pool:
                raise ValueError(f"irrelevant_pool: '{irrelevant_pool}' holds no sentences (the pool is empty)")
            if threshold_quantile is not None and len(self.pool) < 2:
                raise ValueError(
                    f"irrelevant_pool: '{irrelevant_pool}' holds one sentence; threshold_quantile holds out up to "
                    "pool_size of a file pool's sentences (at most half) and needs at least two"
                )
        self.module_spec = module
        self.lr, self.steps, self.norm_constraint, self.weight_decay = lr, steps, norm_constraint, weight_decay
        self.stop_loss, self.stop_flatness, self.stop_on_argmax = stop_loss, stop_flatness, stop_on_argmax
        self.mask_density, self.slack = mask_density, slack
        self.irrelevant_margin, self.edit_margin, self.gap_margin = irrelevant_margin, edit_margin, gap_margin
        self.margin_average = margin_average
        self.ties_density, self.merge_style = ties_density, merge_style
        self.prefixes, self.prefix_length = prefixes, prefix_length
        self.irrelevant_pool, self.pool_size, self.replay = irrelevant_pool, pool_size, replay
        self.irrelevant_per_edit = irrelevant_per_edit
        self.retrieval = retrieval
        self.pool_questions = pool_questions
        self.long_input_max, self.score, self.seed = long_input_max, score, seed
        self.subject_swaps, self.rehearse, self.threshold_quantile = subject_swaps, rehearse, threshold_quantile
        self.swap_kl = swap_kl
        self.train_precision = train_precision
        self._runner: tuple[PreTrainedModel | None] = (None,)  # a tuple: the copy is neither a submodule nor state
        self.spans: list[str] = []  # subject replacements for subject_swaps, cut from model-sampled sentences
        self.held_out: list[str] = []  # the unrelated sentences threshold_quantile measures, never trained on
        if self.pool and threshold_quantile is not None:  # a file pool: its held-out part is the quantile's
            self.pool, self.held_out = _hold_out(self.pool, pool_size, seed + 2)
        self.module_name = ""
        self.block = -1
        self.templates: list[str] = ["{}"]
        self.memory: SideMemory | None = None
        self.router: Router | None = None
        self._log: dict[str, float] = {}

    @staticmethod
    def of(pl_module: object, owner: str) -> WISE:
        """The WISE method of a LightningModule, or an error naming ``owner`` (a callback that needs WISE)."""
        method = getattr(pl_module, "method", None)
        if not isinstance(method, WISE):
            raise ValueError(f"{owner}: needs model.method to be editing.methods.WISE, got {type(method).__name__}")
        return method

    # -- binding -----------------------------------------------------------------------------------------------
    def configure(self, model_id: str, cache_dir: Path) -> None:
        model, tokenizer = self.model, self.tokenizer
        preset = wise_preset(model.config)
        self.module_name, self.block = self._resolve_module(model, preset)
        if self.slack is not None:
            slack = self.slack
        elif preset is not None:
            slack = preset.slack
            log.info("WISE: threshold slack %s, %s for %s", slack, preset.source, preset.name)
        else:
            slack = DEFAULT_SLACK
            log.info("WISE: threshold slack %s (the authors' value for the models they set, but Llama-3-8B)", slack)
        if self.score is None:
            self.score = preset.score if preset is not None else "paper"
            if preset is not None:
                log.info("WISE: routing score '%s', %s for %s", self.score, preset.source, preset.name)
        weight = model.get_submodule(self.module_name).weight
        transposed = isinstance(model.get_submodule(self.module_name), Conv1D)
        shape = tuple(weight.shape[::-1]) if transposed else tuple(weight.shape)
        self.memory = SideMemory(
            shape,
            slack,
            self.mask_density,
            self.seed,
            self.ties_density,
            self.merge_style,
            self.module_name,
            self.score,
        )
        self.memory.to(model.device)
        self._runner = (precision_runner(model, self.train_precision),)  # before the router's hooks: the copy has none
        self.router = Router(self.memory, self.long_input_max, retrieval=self.retrieval)
        self.router.attach(model, self.module_name)
        seeds = PREFIX_SEEDS[: self.prefixes]
        self.templates = generate_context_templates(model, tokenizer, seeds, self.prefix_length, self.seed)
        sampled: list[str] = []
        if self.irrelevant_pool == "model" or self.score == "centred" or self.subject_swaps:
            prompts = [self._pool_seed(i) for i in range(self.pool_size)]
            sampled = [t.strip() for t in sample_text(model, tokenizer, prompts, 20, self.seed + 1, top_k=50)]
        if self.irrelevant_pool == "model":
            self.pool = sampled
        if self.subject_swaps:
            self.spans = _word_spans(sampled)
        if self.score == "centred":  # not state: the same seeded sample of the unedited model gives it on resume
            self.router.centre = self._mean_input(sampled)
        if self.threshold_quantile is not None and self.irrelevant_pool in ("model", "locality"):  # rebuilt on resume
            prompts = [self._pool_seed(i) for i in range(self.pool_size)]
            self.held_out = [t.strip() for t in sample_text(model, tokenizer, prompts, 20, self.seed + 2, top_k=50)]
        if self.threshold_quantile is not None:
            self.memory.floor = self._quantile_floor(self.held_out, self.threshold_quantile)

    @torch.no_grad()
    def _quantile_floor(self, texts: Sequence[str], q: float) -> Callable[[torch.Tensor], float]:
        """``tau -> the q-quantile of its routing scores on texts`` (their projection inputs captured once: the memory
        sits on the projection, so what comes in does not depend on it)."""
        rows = encode_rows(self.tokenizer, list(texts), None, None, device=self.model.device)
        with self.router.disabled():
            a = capture(self.model, rows, {self.module_name: "input"})[self.module_name]
        mask = rows.attention_mask

        def floor(tau: torch.Tensor) -> float:
            return float(torch.quantile(self.router.scores(a, tau, mask), q))

        return floor

    def _pool_seed(self, i: int) -> str:
        """The word the ``i``-th model-sampled pool sentence starts from."""
        if self.pool_questions and i % 2:
            return QUESTION_SEEDS[i // 2 % len(QUESTION_SEEDS)]
        return SAMPLE_SEEDS[(i // 2 if self.pool_questions else i) % len(SAMPLE_SEEDS)]

    @torch.no_grad()
    def _mean_input(self, texts: Sequence[str]) -> torch.Tensor:
        """``(d_in,)`` mean of the side-memory projection's input over the real tokens of ``texts``, unedited."""
        rows = encode_rows(self.tokenizer, list(texts), None, None, device=self.model.device)
        with self.router.disabled():
            a = capture(self.model, rows, {self.module_name: "input"})[self.module_name]
        return a[rows.attention_mask.bool()].float().mean(0)

    def _resolve_module(self, model: PreTrainedModel, preset: WisePreset | None) -> tuple[str, int]:
        """The side-memory projection's path and block index, with errors that say what is allowed."""
        arch = architecture_of(model)
        n_blocks = len(model.get_submodule(arch.blocks))
        spec = self.module_spec
        if spec is None and preset is not None:
            spec = preset.block
            log.info("WISE: side memory in block %d, %s for %s", spec, preset.source, preset.name)
        elif spec is None:
            spec = max(1, int(0.75 * n_blocks))
            log.info(
                "WISE: the authors set no side-memory block for this model (%s, %d blocks): block %d, at 3/4 depth",
                model.config.model_type,
                n_blocks,
                spec,
            )
        if isinstance(spec, str) and spec.isdigit():
            spec = int(spec)
        if isinstance(spec, int):
            if not 1 <= spec < n_blocks:
                raise ValueError(
                    f"module: block {spec} does not exist or is the first; the model has blocks 0..{n_blocks - 1}"
                )
            spec = arch.mlp_out.format(spec)
        try:
            module = model.get_submodule(spec)
        except AttributeError:
            raise ValueError(
                f"module: '{spec}' does not exist in the model (e.g. '{arch.mlp_out.format(n_blocks * 3 // 4)}')"
            ) from None
        if not isinstance(module, nn.Linear | Conv1D):
            raise ValueError(f"module: '{spec}' is a {type(module).__name__}, not a linear projection")
        prefix = arch.blocks + "."
        index = spec[len(prefix) :].split(".")[0] if spec.startswith(prefix) else ""
        if not index.isdigit() or int(index) < 1:
            raise ValueError(f"module: '{spec}' must be a projection inside a decoder block other than the first")
        return spec, int(index)

    # -- one step ----------------------------------------------------------------------------------------------
    def prepare(self, requests: Sequence[EditRequest]) -> EditRows:
        """Rows of the step and their activations below the side memory, captured once without gradient."""
        model, tokenizer = self.model, self.tokenizer
        start = time.perf_counter()
        rng = random.Random(self.seed * 1_000_003 + self.memory.edit_count())  # resumes with the stream
        irrelevant, irr_owner, swapped = self._irrelevant(requests, rng)
        held = self.memory.trained_texts()  # what the task vector trained here already holds
        rehearsed = rng.sample(held, min(self.rehearse, len(held)))
        kept = swapped if self.swap_kl else []
        prompts = [t.replace("{}", r.text) for r in requests for t in self.templates] + [p for p, _ in rehearsed]
        prompts += kept
        targets = [r.target_new for r in requests for _ in self.templates] + [t for _, t in rehearsed]
        targets += [None] * len(kept)
        rows = encode_rows(tokenizer, prompts, None, targets, device=model.device)
        owner = torch.arange(len(requests), device=model.device).repeat_interleave(len(self.templates))
        irr_rows = encode_rows(tokenizer, [t for t, _ in irrelevant], None, None, device=model.device)
        prev_block = f"{architecture_of(model).blocks}.{self.block - 1}"
        with self.router.disabled():
            found = capture(model, rows, {prev_block: "output", self.module_name: "input"})
            a_irr = capture(model, irr_rows, {self.module_name: "input"})[self.module_name]
        self.timings = {"capture": time.perf_counter() - start, "train": 0.0}
        return EditRows(
            rows,
            owner,
            found[prev_block],
            found[self.module_name],
            a_irr,
            irr_rows.attention_mask,
            irr_owner.to(model.device),
            len(kept),
        )

    def _irrelevant(self, requests: Sequence[EditRequest], rng: random.Random) -> tuple[Texts, torch.Tensor, list[str]]:
        """``irrelevant_per_edit`` irrelevant sentences (distinct, as many as the pool or the request's locality
        probes hold) and ``subject_swaps`` subject-swapped prompts per request (-> its request index), plus ``replay``
        old edits (-> -1: all); and the subject-swapped prompts alone, without the target."""
        chosen: Texts = []
        owner: list[int] = []
        swapped: list[str] = []
        for i, r in enumerate(requests):
            if self.irrelevant_pool != "locality":
                texts = self.pool
            elif r.locality:
                texts = [f"{probe.prompt} {probe.answer}" for probe in r.locality]
            else:
                raise ValueError(
                    f"irrelevant_pool: request {r.case_id!r} has no locality probes; use 'model' or a file instead"
                )
            # one draw is rng.choice's: the runs measured before this switch keep their sentences
            drawn = rng.sample(texts, min(self.irrelevant_per_edit, len(texts)))
            chosen += [(text, "") for text in drawn]
            owner += [i] * len(drawn)
        for i, r in enumerate(requests):
            for span in rng.sample(self.spans, min(self.subject_swaps, len(self.spans))):
                swapped.append(r.prompt.replace("{}", span))
                chosen.append((f"{swapped[-1]} {r.target_new}", ""))
                owner.append(i)
        old = [f"{p} {t}" for texts in self.memory.sealed_texts for p, t in texts]
        for text in rng.sample(old, min(self.replay, len(old))):
            chosen.append((text, ""))
            owner.append(-1)
        return chosen, torch.tensor(owner), swapped

    def apply(self, requests: Sequence[EditRequest], plan: EditRows) -> None:
        start = time.perf_counter()
        model = self.model
        rows, owner, a, a_irr = plan.rows, plan.owner, plan.a, plan.a_irr
        n = len(requests)
        full_mask = rows.attention_mask
        positions = torch.arange(full_mask.shape[1], device=full_mask.device)[None]
        prompt_mask = full_mask * (positions <= rows.last_prompt_pos[:, None])
        irr_owner, e = plan.irr_owner, plan.edit_rows  # rows past e are rehearsed edits: cross entropy only
        own = irr_owner[None] == torch.arange(n, device=irr_owner.device)[:, None]  # (n, n_irr)
        pairs = own | (irr_owner[None] == -1)  # replayed edits count against every request
        grad_mask = self.memory.current_mask().float()
        w = self._frozen_weight() if self.weight_decay else None  # (d_out, d_in): W' = W + tau decays toward 0
        tau = self.memory.working.clone().requires_grad_(True)
        opt = torch.optim.SGD([tau], lr=self.lr)
        loss_value, previous, used, tokens = float("nan"), math.inf, self.steps, 0
        runner = self._runner[0] or model
        hidden = plan.hidden.to(runner.dtype)
        trained = len(rows) - plan.kept  # rows with a target; the kept subject swaps follow them
        kept = torch.arange(trained, len(rows), device=full_mask.device)
        kept_end = rows.last_prompt_pos[kept]
        if plan.kept:
            with torch.no_grad(), self.router.disabled():  # the unedited distribution the memory must keep
                final = self._upper_blocks(runner, hidden[kept], full_mask[kept])
                kept_reference = log_softmax_at(runner, final[kept - trained, kept_end])
        swap_value = 0.0
        with self.training_pass(runner, tau):
            for step in range(self.steps):
                with torch.enable_grad():
                    final = self._upper_blocks(runner, hidden, full_mask)
                    tokens += int(full_mask.sum())
                    r, p, ids = rows.target_positions()
                    token_lp, hit = token_log_probs(runner, final[r, p], ids)
                    ce = mean_per_row(-token_lp, r, len(rows))[:trained].mean()
                    s_edit = torch.cat(
                        [
                            self.router.scores(a[:e], tau, full_mask[:e]),
                            self.router.scores(a[:e], tau, prompt_mask[:e]),
                        ]
                    )
                    s_irr = self.router.scores(a_irr, tau, plan.irr_mask)
                    worst_irr = s_irr[None].masked_fill(~pairs, float("-inf")).amax(1)  # (n,)
                    gap = s_edit - worst_irr[owner].repeat(2)
                    routing = (
                        self._hinge(s_irr - self.irrelevant_margin)
                        + self._hinge(self.edit_margin - s_edit)
                        + self._hinge(self.gap_margin - gap)
                    )
                    loss = ce + routing
                    if plan.kept:
                        swap = F.kl_div(
                            log_softmax_at(runner, final[kept, kept_end]),
                            kept_reference,
                            reduction="batchmean",
                            log_target=True,
                        )
                        swap_value = swap.item()
                        loss = loss + self.swap_kl * swap
                    loss_value = loss.item()
                    flat = abs(loss_value - previous) <= self.stop_flatness
                    previous = loss_value
                    if (loss_value <= self.stop_loss and flat) or (
                        self.stop_on_argmax and self._learned(hit, s_edit, gap)
                    ):
                        used = step
                        break
                    opt.zero_grad()
                    loss.backward()
                tau.grad.mul_(grad_mask)
                if w is not None:  # torch SGD's weight decay on W', inside the step and after the mask
                    tau.grad.add_(w + tau.detach(), alpha=self.weight_decay)
                opt.step()
                with torch.no_grad():
                    tau.clamp_(-self.norm_constraint, self.norm_constraint)
        with torch.no_grad():
            self.memory.working = tau.detach()
            bare = torch.arange(0, e, len(self.templates), device=owner.device)  # the "{}" row of each request
            s_bare = torch.minimum(
                self.router.scores(a[bare], self.memory.working, full_mask[bare]),
                self.router.scores(a[bare], self.memory.working, prompt_mask[bare]),
            )
        self.memory.record_edits([(r.text, r.target_new) for r in requests], s_bare)
        self.timings["train"] = time.perf_counter() - start
        self._log = {
            "train/wise_loss": loss_value,
            "train/wise_steps": float(used),
            "train/wise_tokens": float(tokens),
            "train/wise_rehearsed": float(trained - e),
            "wise/edit_score": float(s_bare.min()),
            "wise/threshold": self.memory.answering()[-1][1],  # the current memory's, with its floor
            "wise/memories": float(self.memory.memory_count()),  # after this step's edit, before any merge
            "wise/shard": float(self.memory.shard),
        }
        if plan.kept:
            self._log["train/wise_swap_kl"] = swap_value  # at the last iteration

    def _upper_blocks(self, runner: PreTrainedModel, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Final hidden states of rows whose side-memory block input is ``hidden``: only the blocks from there up."""
        dummy = torch.zeros(mask.shape, dtype=torch.long, device=mask.device)  # embeddings are replaced by `hidden`
        with blocks_from(runner, self.block - 1, hidden):
            return runner.base_model(input_ids=dummy, attention_mask=mask, use_cache=False)[0]

    @contextlib.contextmanager
    def training_pass(self, runner: PreTrainedModel, tau: torch.Tensor) -> Iterator[None]:
        """``runner`` (the model or its reduced-precision copy) with the differentiable task vector ``tau`` answering
        every row at the side-memory projection, and the router off."""
        projection = runner.get_submodule(self.module_name)
        handle = projection.register_forward_hook(lambda m, args, out: out + F.linear(args[0], tau.to(args[0].dtype)))
        try:
            with self.router.disabled():
                yield
        finally:
            handle.remove()

    def _hinge(self, excess: torch.Tensor) -> torch.Tensor:
        """A margin term ``mean max(0, excess)``: over the positive entries only (the release; 0 when none is), or
        over all entries (``margin_average: all``)."""
        positive = excess.clamp(min=0)
        if self.margin_average == "all":
            return positive.mean()
        return positive.sum() / (excess > 0).sum().clamp(min=1)

    def _frozen_weight(self) -> torch.Tensor:
        """The side-memory projection's frozen ``W`` as float32 ``(d_out, d_in)``."""
        module = self.model.get_submodule(self.module_name)
        w = module.weight.detach()
        return (w.T if isinstance(module, Conv1D) else w).float()

    def _learned(self, hit: torch.Tensor, s_edit: torch.Tensor, gap: torch.Tensor) -> bool:
        """Every target token of every row is the argmax, and every edit row meets its routing margins
        (``edit_margin`` and ``gap_margin``; ``irrelevant_margin`` concerns the irrelevant rows only)."""
        return bool(hit.all() and (s_edit >= self.edit_margin).all() and (gap >= self.gap_margin).all())

    def step_log(self) -> dict[str, float]:
        return dict(self._log)

    # -- routing diagnostics and merges ---------------------------------------------------------------------------
    @torch.no_grad()
    def scores_of(self, texts: Sequence[tuple[str, str]], batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing scores ``(M, N)`` of ``(prompt, target)`` texts against every answering memory, and the thresholds
        ``(M,)``. Rows are encoded as evaluation encodes them (prompt + target without its last token; the prompt
        alone for an empty target), so the scores are those the router computes."""
        model, tokenizer = self.model, self.tokenizer
        memories = self.memory.answering()
        out = []
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            rows = encode_rows(tokenizer, [p for p, _ in chunk], None, [t or None for _, t in chunk], model.device)
            with self.router.disabled():
                a = capture(model, rows, {self.module_name: "input"})[self.module_name]
            mask = rows.attention_mask
            out.append(torch.stack([self.router.scores(a, tau, mask) for tau, _ in memories]))
        scores = torch.cat(out, 1) if out else torch.zeros(len(memories), 0)
        return scores, torch.tensor([t for _, t in memories])

    def refresh_thresholds(self) -> None:
        """Recompute every answering memory's lowest edit score from its edit texts (after a merge changed it)."""
        for j, texts in enumerate(self.memory.memory_texts()):
            if not texts:
                continue
            prompts = [(p, "") for p, _ in texts] + [(p, t) for p, t in texts]
            scores, _ = self.scores_of(prompts)
            self.memory.set_min_score(j, float(scores[j].min()))

    def export(self, path: str | Path) -> None:
        """Save the model, tokenizer and side memories (reload with :func:`editing.wise_export.load_edited`)."""
        model, tokenizer = self.model, self.tokenizer
        export_edited(path, model, tokenizer, self.router, self.module_name)

    def extra_repr(self) -> str:
        return f"module={self.module_name or self.module_spec!r}, lr={self.lr}, steps={self.steps}"
