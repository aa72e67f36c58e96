"""``OriginalWeights``: the unedited value of every edited matrix, for callbacks that measure ``W_n - W``."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override


class OriginalWeights(Callback):
    """Keeps the unedited value ``W`` of every edited matrix, for callbacks that measure ``W_n - W``.

    The snapshot is taken at ``on_fit_start`` (or, in a ``validate`` run of an unedited model, at
    ``on_validation_start``) unless a checkpoint restored it. It travels in this callback's checkpoint entry
    ``checkpoint["callbacks"][state_key]["originals"]`` as plain tensors (``torch.load(weights_only=True)`` works).
    """

    def __init__(self) -> None:
        self.originals: dict[str, torch.Tensor] = {}

    def _edited(self, pl_module: LightningModule) -> dict[str, torch.nn.Parameter]:
        """The edited parameters, by module name (parameter layout)."""
        return {name: w.parameter for name, w in pl_module.method.edited_weights().items()}

    def _ensure_originals(self, pl_module: LightningModule) -> bool:
        """Snapshot or check the originals; ``False`` when they cannot be known (a resumed run without them)."""
        edited = self._edited(pl_module)
        if self.originals:
            if set(self.originals) != set(edited):
                raise ValueError(
                    f"{type(self).__name__}: the checkpoint holds original weights of {sorted(self.originals)}, but "
                    f"the method edits {sorted(edited)}; resume with the same layers"
                )
            self.originals = {name: w.to(edited[name].device) for name, w in self.originals.items()}
            return True
        if int(pl_module.edits_done) > 0:
            rank_zero_warn(
                f"{type(self).__name__}: the model holds {int(pl_module.edits_done)} edits but the checkpoint has no "
                "original weights for this callback; it stays inactive (add it from the start of the stream)"
            )
            return False
        self.originals = {name: p.detach().clone() for name, p in edited.items()}
        self._on_originals(pl_module)
        return True

    def _on_originals(self, pl_module: LightningModule) -> None:
        """Hook for derived quantities of a fresh snapshot."""

    def _payload(self) -> dict[str, Any]:
        return {"originals": self.originals}

    def _load_payload(self, payload: dict[str, Any]) -> None:
        self.originals = dict(payload.get("originals", {}))

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.originals:
            checkpoint.setdefault("callbacks", {}).setdefault(self.state_key, {}).update(self._payload())

    @override
    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        entry = checkpoint.get("callbacks", {}).get(self.state_key, {})
        if "originals" in entry:
            self._load_payload(entry)
