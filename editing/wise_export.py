"""Export and reload of a WISE-edited model, so it is usable outside this framework.

The export is the unedited model and its tokenizer (``save_pretrained`` into ``unedited_base/``), plus
``side_memory.safetensors`` (the task vector of every answering memory, and the centre of a centred score) and
``side_memory.json`` (the module they sit on, their thresholds, the router's long-input rule and its retrieval rule).
:func:`load_edited` rebuilds a Hugging Face model with the router installed, which routes exactly like the model
that was exported.

The edits are not in the weights, so plain ``AutoModelForCausalLM.from_pretrained(path)`` would give the unedited
model: the top-level ``config.json`` names a model type that does not exist, so transformers refuses the directory with
an error that quotes it, and the type says to use :func:`load_edited`. (A concrete class, ``LlamaForCausalLM``, finds
no weights at the top level and fails too.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from editing.router import Router

EXPORT_TENSORS = "side_memory.safetensors"
EXPORT_CONFIG = "side_memory.json"
BASE_DIR = "unedited_base"
GUARD_MODEL_TYPE = "wise-side-memory-export: load it with editing.wise_export.load_edited(path), not from_pretrained"


@dataclass
class ExportedMemories:
    """The memories of an exported model: fixed task vectors and thresholds (nothing is edited after export)."""

    taus: list[torch.Tensor]
    thresholds: list[float]

    def answering(self) -> list[tuple[torch.Tensor, float]]:
        return list(zip(self.taus, self.thresholds, strict=True))


def export_edited(
    path: str | Path,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    router: Router,
    module_name: str,
) -> None:
    """Save the unedited model, its tokenizer and the memories answering through ``router`` with their thresholds."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with router.disabled():
        model.save_pretrained(path / BASE_DIR)
    tokenizer.save_pretrained(path / BASE_DIR)
    guard = {"model_type": GUARD_MODEL_TYPE, "base_model": BASE_DIR, "side_memory": EXPORT_CONFIG}
    (path / "config.json").write_text(json.dumps(guard, indent=2))
    memories = router.bank.answering()
    tensors = {f"memory_{i}": tau.detach().float().cpu().contiguous() for i, (tau, _) in enumerate(memories)}
    if router.centre is not None:
        tensors["centre"] = router.centre.detach().float().cpu().contiguous()
    save_file(tensors, str(path / EXPORT_TENSORS))
    config = {
        "module": module_name,
        "thresholds": [t for _, t in memories],
        "long_input_max": router.long_input_max,
        "centred": router.centre is not None,
        "retrieval": router.retrieval,
    }
    (path / EXPORT_CONFIG).write_text(json.dumps(config, indent=2))


def load_edited(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, Router]:
    """Load a model written by :func:`export_edited` with its router installed (frozen: for inference); the router's
    ``last_route`` shows its decisions."""
    path = Path(path)
    config = json.loads((path / EXPORT_CONFIG).read_text())
    base = path / BASE_DIR if (path / BASE_DIR).is_dir() else path  # exports from before the guard: the top level
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).to(device).eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tensors = load_file(str(path / EXPORT_TENSORS), device=str(device))
    taus = [tensors[f"memory_{i}"] for i in range(len(config["thresholds"]))]
    centre = tensors["centre"] if config.get("centred") else None
    memories = ExportedMemories(taus, list(config["thresholds"]))
    router = Router(memories, config["long_input_max"], centre, config.get("retrieval", "score"))
    router.attach(model, config["module"])
    return model, tokenizer, router
