"""``GeneralAbility``: zero-shot SST-2, MRPC, CoLA, RTE, MMLU and NLI scores before the first edit and at every
evaluation (DESIGN.md section 8, the AlphaEdit/LyapLock "general capability" protocol).

Sequential edits are expected to erode what the model could do before; AlphaEdit and LyapLock track it with six
classification tasks from GLUE-style files (``glue_eval/dataset/*.pkl`` of their releases, converted to JSON in
``../shared/data/general_eval``). The model answers a task zero-shot: after the task's prompt, every label word is
scored as a teacher-forced continuation (mean per-token log-probability of ``" " + label``, the length
normalisation of AlphaEdit's ``glue_eval``), and the best-scoring label is the answer (ties go to the first label).

Prompts (written for this project in the spirit of ``glue_eval``; ``{field}`` is the record's field, ``\\n`` a
newline) and label words in class order, each scored with one leading space:

- ``sst2``: ``Review: {sentence}\\nSentiment:`` -> negative, positive.
- ``mrpc``: ``Sentence 1: {sentence1}\\nSentence 2: {sentence2}\\nDo both sentences mean the same thing? Answer:``
  -> No, Yes.
- ``cola``: ``Sentence: {sentence}\\nIs this sentence grammatically acceptable? Answer:`` -> No, Yes.
- ``rte`` and ``nli``: ``{sentence1}\\nQuestion: {sentence2} True or False?\\nAnswer:`` -> True, False.
- ``mmlu``: ``The following is a multiple choice question about {subject}.\\n\\n{question}\\nA. {choices[0]}\\nB.
  {choices[1]}\\nC. {choices[2]}\\nD. {choices[3]}\\nAnswer:`` -> A, B, C, D (the first line only when the record
  has a ``subject``, with underscores as spaces).

Label sets (GLUE's conventions): ``sst2`` 1 = positive; ``mrpc`` 1 = paraphrase; ``cola`` 1 = acceptable; ``rte`` 0 =
entailment (scored as " True"), 1 = not_entailment; ``nli`` the strings ``entailment`` / ``not_entailment``; ``mmlu``
``answer`` indexes the four ``choices``. AlphaEdit's ``rte_eval.py`` turns the higher " True" score into class 1
(not_entailment), the opposite of GLUE's labels; here " True" is entailment for both RTE and NLI.

Metric: weighted F1 over the classes (scikit-learn's ``average="weighted"``, which AlphaEdit reports) for SST-2,
MRPC, CoLA, RTE and NLI; accuracy for MMLU. With equal class supports (the first 100 records of the shipped files)
weighted F1 equals macro F1. Examples are the first ``examples`` records of each file (AlphaEdit's
``number_of_tests=100`` with zero shots); the shipped files alternate classes, so the first 100 are balanced.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from typing_extensions import override

from editing.distributed import gather_lists, share
from editing.forward import target_log_probs
from editing.rows import EncodedRows, max_positions, mean_per_row, pad_right, target_token_ids

REPO = Path(__file__).resolve().parents[1]
TASKS = ("sst2", "mrpc", "cola", "rte", "mmlu", "nli")
LABELS: dict[str, tuple[str, ...]] = {  # label words of each task, in class order
    "sst2": ("negative", "positive"),
    "mrpc": ("No", "Yes"),
    "cola": ("No", "Yes"),
    "rte": ("True", "False"),
    "mmlu": ("A", "B", "C", "D"),
    "nli": ("True", "False"),
}
_TEXT_FIELDS = {
    "sst2": ("sentence",),
    "mrpc": ("sentence1", "sentence2"),
    "cola": ("sentence",),
    "rte": ("sentence1", "sentence2"),
    "mmlu": ("question",),
    "nli": ("sentence1", "sentence2"),
}
METRICS: dict[str, Literal["f1", "accuracy"]] = {task: "accuracy" if task == "mmlu" else "f1" for task in TASKS}
_NLI_CLASSES = ("entailment", "not_entailment")


# -- the metric -----------------------------------------------------------------------------------------------------
def weighted_f1(gold: Sequence[int], predicted: Sequence[int], num_classes: int) -> float:
    """F1 of every class, averaged with the class's share of ``gold`` as weight (scikit-learn's ``weighted``).

    A class never predicted has precision 0/0, taken as 0 (scikit-learn's ``zero_division`` default).

    Example (class 0: P = 1, R = 1/2, F1 = 2/3; class 1: P = 2/3, R = 1, F1 = 4/5; supports 2 and 2):
        >>> round(weighted_f1([0, 0, 1, 1], [0, 1, 1, 1], 2), 12)
        0.733333333333
    """
    if len(gold) != len(predicted) or not gold:
        raise ValueError(f"weighted_f1: need as many predictions as labels (> 0), got {len(predicted)}, {len(gold)}")
    total = 0.0
    for c in range(num_classes):
        tp = sum(g == c and p == c for g, p in zip(gold, predicted, strict=True))
        support = sum(g == c for g in gold)
        predicted_c = sum(p == c for p in predicted)
        if tp:
            total += support * 2 * tp / (support + predicted_c)  # F1 = 2 TP / (|gold = c| + |predicted = c|)
    return total / len(gold)


def accuracy(gold: Sequence[int], predicted: Sequence[int]) -> float:
    """Share of exact matches."""
    return sum(g == p for g, p in zip(gold, predicted, strict=True)) / len(gold)


# -- the tasks ------------------------------------------------------------------------------------------------------
@dataclass
class TaskExamples:
    """One task's prompts and gold classes (indices into ``labels``), read and checked once."""

    name: str
    kind: str
    path: Path
    prompts: list[str]
    gold: list[int]
    labels: tuple[str, ...]
    fingerprint: str  # of the evaluated records: a resumed history is only comparable on the same ones


def task_kind(name: str) -> str:
    """The layout and prompt of task ``name``: a known task, optionally followed by ``_anything`` (``sst2_dev``)."""
    kind = name.split("_", 1)[0]
    if kind not in TASKS:
        raise ValueError(f"tasks: unknown task {name!r}; a name is one of {', '.join(TASKS)} [+ '_suffix']")
    return kind


def _problem(record: Any, kind: str) -> tuple[str, str] | None:
    """``(field, problem)`` of the first bad field of a record of ``kind``, or None."""
    if not isinstance(record, dict):
        return "", f"expected an object, got {type(record).__name__}"
    for field in _TEXT_FIELDS[kind]:
        if field not in record:
            return field, "is missing"
        if not isinstance(record[field], str) or not record[field].strip():
            return field, "must be a non-empty string"
    if kind == "mmlu":
        choices = record.get("choices")
        if not isinstance(choices, list) or len(choices) != 4 or not all(isinstance(c, str) for c in choices):
            return "choices", "is missing" if choices is None else "must be a list of 4 strings"
        subject = record.get("subject")
        if subject is not None and not isinstance(subject, str):
            return "subject", "must be a string"
    field = "answer" if kind == "mmlu" else "label"
    allowed: tuple[Any, ...] = _NLI_CLASSES if kind == "nli" else tuple(range(len(LABELS[kind])))
    if field not in record:
        return field, "is missing"
    value = record[field]
    if isinstance(value, bool) or value not in allowed:
        return field, f"must be one of {', '.join(map(repr, allowed))}, got {value!r}"
    return None


def task_prompt(record: dict[str, Any], kind: str) -> str:
    """The zero-shot prompt of a (checked) record; the label words follow it (module docstring)."""
    if kind == "sst2":
        return f"Review: {record['sentence'].strip()}\nSentiment:"
    if kind == "cola":
        return f"Sentence: {record['sentence'].strip()}\nIs this sentence grammatically acceptable? Answer:"
    if kind == "mrpc":
        return (
            f"Sentence 1: {record['sentence1'].strip()}\nSentence 2: {record['sentence2'].strip()}\n"
            "Do both sentences mean the same thing? Answer:"
        )
    if kind in ("rte", "nli"):
        return f"{record['sentence1'].strip()}\nQuestion: {record['sentence2'].strip()} True or False?\nAnswer:"
    subject = (record.get("subject") or "").replace("_", " ").strip()
    header = f"The following is a multiple choice question about {subject}.\n\n" if subject else ""
    options = "".join(f"\n{letter}. {choice.strip()}" for letter, choice in zip("ABCD", record["choices"]))
    return f"{header}{record['question'].strip()}{options}\nAnswer:"


def _gold(record: dict[str, Any], kind: str) -> int:
    if kind == "nli":
        return _NLI_CLASSES.index(record["label"])
    return int(record["answer" if kind == "mmlu" else "label"])


def _records(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    records = json.loads(text)
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    return records


def read_task(name: str, path: Path, examples: int | None) -> TaskExamples:
    """Check every record of ``path`` (a JSON list, or JSON Lines) and keep the first ``examples``.

    Raises ``ValueError("<path>: record <i>: field '<f>' <problem>")`` at the first bad record.
    """
    kind = task_kind(name)
    try:
        records = _records(path)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    for i, record in enumerate(records):
        problem = _problem(record, kind)
        if problem is not None:
            field, message = problem
            raise ValueError(f"{path}: record {i}: " + (f"field '{field}' {message}" if field else message))
    if not records:
        raise ValueError(f"{path}: no records")
    kept = records if examples is None else records[:examples]
    digest = hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]
    prompts = [task_prompt(r, kind) for r in kept]
    return TaskExamples(name, kind, path, prompts, [_gold(r, kind) for r in kept], LABELS[kind], digest)


# -- scoring --------------------------------------------------------------------------------------------------------
@torch.no_grad()
def label_log_probs(
    model: PreTrainedModel,
    prompt_ids: Sequence[Sequence[int]],
    label_ids: Sequence[Sequence[int]],
    pad_token_id: int,
    batch_size: int = 16,
) -> torch.Tensor:
    """``(n_prompts, n_labels)`` mean per-token log-probability of every label continuing every prompt.

    When every label is one token, one row per prompt suffices: the label scores are read from the next-token
    distribution at its last token. Otherwise a row is ``prompt + label[:-1]``, one per (prompt, label). Either way
    ``batch_size`` rows go through one forward pass, rows sorted by length so little is padded, and the LM head runs
    only at the scored positions (:func:`editing.forward.target_log_probs`).
    """
    one_token = all(len(ids) == 1 for ids in label_ids)
    if one_token:
        pairs: list[tuple[int, int | None]] = [(i, None) for i in range(len(prompt_ids))]
    else:
        pairs = [(i, j) for i in range(len(prompt_ids)) for j in range(len(label_ids))]
    first = torch.tensor([ids[0] for ids in label_ids])
    scores = torch.empty(len(prompt_ids), len(label_ids))
    pairs.sort(key=lambda pair: len(prompt_ids[pair[0]]) + (0 if pair[1] is None else len(label_ids[pair[1]])))
    device = model.device
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start : start + batch_size]
        targets = [label_ids[0][:1] if j is None else list(label_ids[j]) for _, j in batch]
        rows = [list(prompt_ids[i]) + t[:-1] for (i, _), t in zip(batch, targets, strict=True)]
        ids, mask = pad_right(rows, pad_token_id, device)
        width = max(len(t) for t in targets)
        target = torch.full((len(batch), width), -100, dtype=torch.long)
        for k, t in enumerate(targets):
            target[k, : len(t)] = torch.tensor(t)
        last = torch.tensor([len(prompt_ids[i]) - 1 for i, _ in batch], device=device)
        encoded = EncodedRows(ids, mask, torch.full_like(last, -1), last, target.to(device))
        log_p, row, token = target_log_probs(model, encoded)  # (tokens, V): one per label token of a row
        owner = torch.tensor([i for i, _ in batch])
        if one_token:
            scores[owner] = log_p[:, first.to(device)].cpu()  # (b, n_labels): every label read at once
        else:
            per_row = mean_per_row(log_p.gather(1, token[:, None])[:, 0], row, len(batch)).cpu()
            scores[owner, torch.tensor([j for _, j in batch])] = per_row
    return scores


def predict(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task: TaskExamples, batch_size: int = 16
) -> tuple[list[int], int]:
    """The best-scoring label of every example of ``task`` (the first on ties), and how many prompts were cut.

    A prompt that would not fit the model's positions with its longest label is cut at the start (its end holds
    the question and the answer cue). In a multi-process run each rank scores its share of the examples and the
    predictions are gathered (collective).
    """
    label_ids = [target_token_ids(tokenizer, label) for label in task.labels]
    limit = max_positions(model.config)
    room = None if limit is None else limit - max(len(ids) for ids in label_ids) + 1
    prompt_ids = tokenizer(task.prompts)["input_ids"]
    cut = 0
    if room is not None:
        cut = sum(len(ids) > room for ids in prompt_ids)
        prompt_ids = [ids[-room:] for ids in prompt_ids]
    mine = share(prompt_ids)
    was_training = model.training
    model.eval()
    try:
        scores = label_log_probs(model, mine, label_ids, tokenizer.pad_token_id or 0, batch_size) if mine else None
    finally:
        model.train(was_training)
    predicted = scores.argmax(1).tolist() if scores is not None else []  # argmax returns the first maximum
    return gather_lists(predicted), cut


def task_score(task: TaskExamples, predicted: Sequence[int]) -> float:
    """The reported score of ``task``: weighted F1, or accuracy for MMLU (module docstring)."""
    if METRICS[task.kind] == "accuracy":
        return accuracy(task.gold, predicted)
    return weighted_f1(task.gold, predicted, len(task.labels))


class GeneralAbility(Callback):
    """Logs ``general/<task>`` zero-shot scores on the unedited model and at the end of every evaluation.

    The first measurement is taken at ``on_fit_start``, before the first edit, and logged at step 0 together with
    ``edits/total = 0`` (directly to the loggers: Lightning allows no ``self.log`` there); then every evaluation
    logs the scores in ``on_validation_epoch_end``, so ``--trainer.val_check_interval`` sets how many edit steps lie
    between two points. A resumed run keeps its baseline and does not re-measure it. :attr:`history` holds ``{"edits",
    "scores": {task: value}}`` per measurement (sanity checks skipped) and is checkpointed.

    With :class:`~callbacks.prune.PruneRestraint` (``posthoc``) the scores are those of the restrained weights,
    whatever the order of the two callbacks: PRUNE swaps them in at ``on_validation_start`` and out at
    ``on_validation_end``, around this callback's hook.

    Every file is read and every record checked at ``setup``, before the model is loaded and before any edit; a bad
    record fails with one line naming the file, the record index and the field. Prompts, label sets and metrics per
    task are in the module docstring. Cost: one measurement of the six tasks (600 examples) took 174 s on
    SmolLM2-135M on one busy CPU thread, MMLU and NLI (the longest prompts) more than half of it.

    Args:
        data_dir: directory holding ``<task>.json`` for every task of ``tasks`` given by name (the ROME/AlphaEdit
            ``glue_eval`` files as converted in ``../shared/data/general_eval``). A relative path is looked up from
            the working directory, then from the repository root, so the default finds ``../shared/data`` beside a
            checkout from anywhere.
        tasks: which tasks: ``None`` (all six), a list of task names read from ``data_dir``, or a mapping of task
            name to file path (``{sst2: my/sst2.json, mmlu_dev: mmlu.json}``; then ``data_dir`` is not used). A
            name is ``sst2``, ``mrpc``, ``cola``, ``rte``, ``mmlu`` or ``nli``, optionally with a ``_suffix`` to
            score several files of one layout; the score is logged as ``general/<name>``. Files are JSON lists of
            records (or ``.jsonl``) in the ``glue_eval`` layout.
        examples: the first this many records of every file are evaluated (``None``: all of them).
        batch_size: rows per forward pass (a row is a prompt, or a prompt and one label when labels are longer than
            one token).
        on_missing: what to do when ``data_dir`` or a task file does not exist: ``error`` (at ``setup``, naming the
            argument) or ``warn`` (skip those tasks with a warning; with none left the callback does nothing).
    """

    def __init__(
        self,
        data_dir: str = "../shared/data/general_eval",
        tasks: list[str] | dict[str, str] | None = None,
        examples: int | None = 100,
        batch_size: int = 16,
        on_missing: Literal["error", "warn"] = "error",
    ) -> None:
        names = list(tasks) if tasks is not None else list(TASKS)
        if not names:
            raise ValueError("tasks: give at least one task (or None for all six)")
        if len(set(names)) != len(names):
            raise ValueError(f"tasks: a task is listed twice in {names}")
        for name in names:
            task_kind(name)
        if examples is not None and examples < 1:
            raise ValueError(f"examples: must be >= 1 or None (all records), got {examples}")
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        if on_missing not in ("error", "warn"):
            raise ValueError(f"on_missing: expected 'error' or 'warn', got {on_missing!r}")
        self.data_dir = data_dir
        self.tasks = dict(tasks) if isinstance(tasks, dict) else (list(tasks) if tasks is not None else None)
        self.examples = examples
        self.batch_size = batch_size
        self.on_missing = on_missing
        self.loaded: list[TaskExamples] | None = None  # read at setup
        self.history: list[dict[str, Any]] = []
        self.fingerprints: dict[str, str] = {}  # of the records the history was measured on
        self._warned_cut: set[str] = set()

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(data_dir=self.data_dir, tasks=self.tasks, examples=self.examples)

    # -- files -------------------------------------------------------------------------------------------------
    @staticmethod
    def _resolve(path: str) -> Path:
        """``path`` from the working directory, else from the repository root (where it exists)."""
        here = Path(path).expanduser()
        if here.is_absolute() or here.exists() or not (REPO / here).exists():
            return here
        return REPO / here

    def _paths(self) -> dict[str, Path]:
        """Task name -> file; a missing directory or file raises or warns (``on_missing``)."""
        if isinstance(self.tasks, dict):
            paths = {name: self._resolve(p) for name, p in self.tasks.items()}
            where = {name: f"tasks.{name}" for name in paths}
        else:
            directory = self._resolve(self.data_dir)
            if not directory.is_dir():
                message = (
                    f"data_dir: directory '{self.data_dir}' does not exist (GLUE-layout files <task>.json, e.g. "
                    "../shared/data/general_eval); give data_dir or tasks as {name: path}"
                )
                if self.on_missing == "error":
                    raise ValueError(message)
                rank_zero_warn(f"GeneralAbility: {message}; general ability is not measured")
                return {}
            names = self.tasks if self.tasks is not None else list(TASKS)
            paths = {name: directory / f"{task_kind(name)}.json" for name in names}
            where = {name: "data_dir" for name in paths}
        found = {}
        for name, path in paths.items():
            if path.is_file():
                found[name] = path
                continue
            message = f"{where[name]}: file '{path}' for task {name} does not exist"
            if self.on_missing == "error":
                raise ValueError(message)
            rank_zero_warn(f"GeneralAbility: {message}; task {name} is skipped")
        return found

    def load(self) -> list[TaskExamples]:
        """Read and check every task file once (at ``setup``); later calls return the same tasks."""
        if self.loaded is None:
            self.loaded = [read_task(name, path, self.examples) for name, path in self._paths().items()]
            self._check_fingerprints()
        return self.loaded

    def _check_fingerprints(self) -> None:
        """Warn when a resumed history was measured on other records (callback state is restored after setup)."""
        for task in self.loaded or []:
            known = self.fingerprints.get(task.name)
            if known is not None and known != task.fingerprint:
                rank_zero_warn(
                    f"GeneralAbility: the records of task {task.name} ({task.path}) differ from those of the "
                    "checkpointed history; earlier and later scores are not comparable"
                )

    # -- measuring ---------------------------------------------------------------------------------------------
    def compute(self, pl_module: LightningModule) -> dict[str, float]:
        """Score of every task under the current weights (without logging it)."""
        out = {}
        for task in self.load():
            predicted, cut = predict(pl_module.model, pl_module.tokenizer, task, self.batch_size)
            if cut and task.name not in self._warned_cut:
                self._warned_cut.add(task.name)
                rank_zero_warn(f"GeneralAbility: {cut} {task.name} prompts exceed the model's positions; cut at start")
            out[task.name] = task_score(task, predicted)
        return out

    def _measure(self, pl_module: LightningModule) -> dict[str, float]:
        scores = self.compute(pl_module)
        self.fingerprints.update({task.name: task.fingerprint for task in self.load()})
        self.history.append({"edits": int(pl_module.edits_done), "scores": dict(scores)})
        return scores

    # -- hooks -------------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        tasks = self.load()
        if tasks:
            counts = ", ".join(f"{t.name} {len(t.prompts)}" for t in tasks)
            rank_zero_info(f"GeneralAbility: {counts} examples")

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.load() or int(pl_module.edits_done) > 0 or any(h["edits"] == 0 for h in self.history):
            return  # nothing to score, or resumed: the unedited baseline is measured once
        scores = self._measure(pl_module)
        metrics = {f"general/{name}": value for name, value in scores.items()}
        for logger in trainer.loggers:
            logger.log_metrics({**metrics, "edits/total": 0.0}, step=trainer.global_step)

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not self.load():
            return
        for name, value in self._measure(pl_module).items():
            pl_module.log(f"general/{name}", value, sync_dist=True)  # equal on every rank: no warning

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "history": [{**h, "scores": dict(h["scores"])} for h in self.history],
            "fingerprints": self.fingerprints,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [{**h, "scores": dict(h["scores"])} for h in state_dict.get("history", [])]
        self.fingerprints = dict(state_dict.get("fingerprints", {}))
        self._check_fingerprints()
