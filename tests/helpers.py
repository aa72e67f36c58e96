"""Shared helpers for tests that run the command line on the tiny model (see the ``tiny_run`` fixture)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
# a C0 eigenvalue threshold of each tiny model family below which about half of its spectrum lies (null-space tests)
NULLSPACE_THRESHOLD = {"llama": 1.0, "gpt2": 0.1}


def _fit_args(run: dict[str, Path], config: str, root: Path, settings: list[str], extra: tuple[str, ...]) -> list[str]:
    """``fit`` with ``configs/<config>.yaml`` on the saved tiny model, offline, into ``root``; ``settings`` make it
    small, ``extra`` comes last (``callbacks+=`` and its init args, overrides)."""
    return [
        "fit",
        "--config", str(REPO / "configs" / f"{config}.yaml"),
        "--model.model_name", str(run["model"]),
        "--model.cache_dir", str(run["cache"]),
        "--data.path", str(run["data"]),
        *settings,
        "--trainer.default_root_dir", str(root),
        "--trainer.enable_progress_bar", "false",
        *extra,
    ]  # fmt: skip


def tiny_fit_args(run: dict[str, Path], config: str, root: Path, *extra: str) -> list[str]:
    """``fit`` with a shipped config on blocks 1-2 of the tiny model, offline and small; ``extra`` overrides."""
    small = [
        "--model.method.init_args.layers", "[1, 2]",
        "--model.method.init_args.stats_corpus", str(run["corpus"]),
        "--model.method.init_args.stats_tokens", "300",
        "--model.method.init_args.context_seeds", "[The]",
        "--model.method.init_args.context_length", "3",
        "--model.method.init_args.target_steps", "5",
        "--data.edits_per_step", "1",
    ]  # fmt: skip
    return _fit_args(run, config, root, small, extra)


def tiny_ft_args(run: dict[str, Path], root: Path, *extra: str) -> list[str]:
    """``fit`` with configs/ft.yaml on block 1 of the tiny model, one edit per step, evaluated after every step: the
    cheapest run that exercises a callback over the stream; ``extra`` adds to it."""
    small = [
        "--model.method.init_args.layer", "1",
        "--model.method.init_args.lr", "0.5",
        "--model.method.init_args.steps", "3",
        "--model.method.init_args.norm_constraint", "null",
        "--data.edits_per_step", "1",
        "--trainer.val_check_interval", "1",
    ]  # fmt: skip
    return _fit_args(run, "ft", root, small, extra)


def wise_fit_args(run: dict[str, Path], root: Path, *extra: str) -> list[str]:
    """``fit`` with configs/wise.yaml on the tiny model: the side memory in block 2, few prefixes and steps."""
    small = [
        "--model.method.init_args.module", "2",
        "--model.method.init_args.prefixes", "2",
        "--model.method.init_args.prefix_length", "3",
        "--model.method.init_args.pool_size", "4",
        "--model.method.init_args.steps", "5",
    ]  # fmt: skip
    return _fit_args(run, "wise", root, small, extra)


def callbacks_config(path: Path, *callbacks: tuple[str, dict]) -> Path:
    """A YAML config that sets ``trainer.callbacks`` (lists in configs are replaced as a whole), for a second
    ``--config``: ``(class_path, init_args)`` per callback."""
    entries = [{"class_path": name, "init_args": args} for name, args in callbacks]
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": entries}}))
    return path


@torch.no_grad()
def inflate_rank_one(W: torch.Tensor, factor: float = 30.0) -> None:
    """Add a random rank-one edit of ``factor * sigma_max(W)`` to ``W`` in place: an accumulated edit that PRUNE
    restrains for any ``log_base``."""
    u, v = torch.randn(W.shape[0], 1), torch.randn(W.shape[1], 1)
    W += factor * torch.linalg.svdvals(W)[0] * (u @ v.T) / (u.norm() * v.norm())


# A fresh interpreter that knows transformers only: loads the directory, checks that none of this project was
# imported, and saves its tokenization and logits (``plain.pt``) for the test to compare.
_PLAIN_LOAD = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
torch.set_num_threads(1)
directory, texts, out = sys.argv[1], sys.argv[2].split("|"), sys.argv[3]
model = AutoModelForCausalLM.from_pretrained(directory)
tokenizer = AutoTokenizer.from_pretrained(directory)
batch = tokenizer(texts, return_tensors="pt", padding=True)
ours = sorted(m for m in sys.modules if m.split(".")[0] in ("editing", "callbacks", "main"))
assert not ours, ours
with torch.no_grad():
    torch.save({"ids": batch["input_ids"], "logits": model(**batch).logits}, out)
"""


def plain_load(directory: Path, texts: list[str], workdir: Path) -> subprocess.CompletedProcess:
    """Load ``directory`` with plain ``AutoModelForCausalLM.from_pretrained`` in a fresh process run in ``workdir``
    (not the repository), and write the logits of ``texts`` to ``workdir / "plain.pt"``."""
    return subprocess.run(
        [sys.executable, "-c", _PLAIN_LOAD, str(directory), "|".join(texts), str(workdir / "plain.pt")],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=300,
    )
