"""Export of an edited model where people use models: a Hugging Face directory (safetensors, config, tokenizer).

Weight-editing methods (LyapLock, MEMIT, AlphaEdit, FT) change the model's own weights, so their export is the edited
model's ``save_pretrained``: plain ``AutoModelForCausalLM.from_pretrained(path)`` loads it without this package and
predicts what the edited model predicts. A callback that decides which weights are the run's result takes part through
``export_weights`` (:class:`ExportTransform`: ``PruneRestraint`` swaps its restrained weights in). WISE edits a side
memory behind a router instead: its export (:mod:`editing.wise_export`) loads with ``load_edited``, and plain
``from_pretrained`` refuses it with a message naming that function, rather than load the unedited model.

Used by ``python main.py export --ckpt_path RUN/checkpoints/last.ckpt --export_dir DIR``, by the callbacks'
``export_dir`` at the end of ``fit``, and by ``Editor.export``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol, runtime_checkable

from lightning.pytorch import LightningModule


@runtime_checkable
class ExportTransform(Protocol):
    """A callback that changes the exported weights: inside ``export_weights`` the module holds what to write."""

    def export_weights(self, pl_module: LightningModule, step: int) -> AbstractContextManager[None]:
        """The weights to export after ``step`` edit steps, in place for the ``with`` block, restored after it."""
        ...


def export_model(pl_module: LightningModule, path: str | Path, callbacks: Iterable[object] = (), step: int = 0) -> Path:
    """Write the edited model of ``pl_module`` (an ``EditingModule``) to ``path`` with its method's ``export``.

    Args:
        pl_module: the module, its model loaded and its edits in place.
        path: the directory to write (created; files of an earlier export are overwritten).
        callbacks: the run's callbacks; those that are :class:`ExportTransform` set the weights written.
        step: edit steps done so far (what the callbacks' policies read).
    """
    path = Path(path)
    with contextlib.ExitStack() as stack:
        for callback in callbacks:
            if isinstance(callback, ExportTransform):
                stack.enter_context(callback.export_weights(pl_module, step))
        pl_module.method.export(path)
    return path
