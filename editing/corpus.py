"""Text corpora for the preserved-knowledge statistic C0.

``"model"`` samples text from the model itself, so the embedded default works with no data and no network (the
sample is cached on disk); a ``.txt`` file gives one text per non-empty line (WikiText headings ``= x =`` skipped);
a ``.jsonl`` file gives the ``"text"`` field of each line; ``"hf:NAME[:CONFIG]"`` reads the train split of a Hugging
Face dataset already on the machine (needs the ``datasets`` package).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from editing.cache import atomic_path
from editing.distributed import machine_lock
from editing.models import sample_text
from editing.stats import corpus_fingerprint

log = logging.getLogger(__name__)

SAMPLE_SEEDS = ("The", "In", "A", "It", "This", "He", "She", "There", "When", "After", "One", "Many")
_SAMPLE_LENGTH = 128


def load_corpus(
    spec: str,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tokens: int,
    seed: int,
    cache_dir: Path,
) -> tuple[list[str], str]:
    """The corpus texts and a fingerprint that keys the statistics cache."""
    if spec == "model":
        return _model_sample(model, tokenizer, tokens, seed, cache_dir)
    if spec.startswith("hf:"):
        texts = _hf_texts(spec[3:])
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ValueError(f"stats_corpus: file '{spec}' does not exist (use 'model', a .txt/.jsonl file or hf:NAME)")
        texts = file_texts(path)
    if not texts:
        raise ValueError(f"stats_corpus: '{spec}' contains no text")
    return texts, corpus_fingerprint(texts)


def file_texts(path: Path) -> list[str]:
    """The texts of a ``.txt`` (one per non-empty line, WikiText ``= headings =`` skipped) or ``.jsonl`` (``"text"``)
    file."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                texts.append(str(json.loads(line)["text"]))
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(
                    f"stats_corpus: {path.name}: line {number}: expected a JSON object with 'text'"
                ) from err
        return texts
    return [s for s in (line.strip() for line in lines) if s and not s.startswith("=")]


def _hf_texts(name: str) -> list[str]:
    try:
        import datasets
    except ImportError as err:
        raise ValueError("stats_corpus: 'hf:' corpora need the 'datasets' package (pip install datasets)") from err
    dataset_name, _, config = name.partition(":")
    data = datasets.load_dataset(dataset_name, config or None, split="train")
    return [t for t in data["text"] if t.strip()]


def _model_sample(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, tokens: int, seed: int, cache_dir: Path
) -> tuple[list[str], str]:
    """Sample ``tokens`` tokens of free text from the model (temperature 1), cached per model, size and seed."""
    fingerprint = f"{model.config.model_type}-{model.config.hidden_size}-{model.num_parameters()}"
    path = cache_dir / "corpus" / f"model-sample-{fingerprint}-{tokens}-{seed}.json"
    with machine_lock(path):  # the processes of a multi-process run sample it once
        if not path.exists():
            _write_model_sample(model, tokenizer, tokens, seed, path)
    texts = json.loads(path.read_text())
    return texts, corpus_fingerprint(texts)


def _write_model_sample(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, tokens: int, seed: int, path: Path
) -> None:
    n_seq = -(-tokens // _SAMPLE_LENGTH)
    log.info("Sampling a %d-token corpus from the model for C0 (once; cached in %s)", tokens, path)
    texts: list[str] = []
    with tqdm(total=n_seq, desc="C0 corpus sample", unit="seq") as bar:
        for start in range(0, n_seq, 64):
            prompts = [SAMPLE_SEEDS[i % len(SAMPLE_SEEDS)] for i in range(start, min(n_seq, start + 64))]
            texts += sample_text(model, tokenizer, prompts, _SAMPLE_LENGTH, seed + start)
            bar.update(len(prompts))
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(texts))
