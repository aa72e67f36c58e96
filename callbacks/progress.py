"""``EditProgressBar``: Lightning's tqdm bar, with edits done, edits per minute, time left and the latest scores."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar
from typing_extensions import override

# The latest evaluation's scores as shown beside the bar (``val/efficacy`` -> ``eff``); others keep their name.
_SHORT = {"efficacy": "eff", "generalization": "gen", "specificity": "spec", "locality": "loc", "fluency": "flu"}
# the sample's size and efficacy per age group: in the logs, not worth the bar's width
_HIDDEN = ("val/scored_edits", "val/efficacy_by_age/")


class EditProgressBar(TQDMProgressBar):
    """The progress bar of the command line: beside Lightning's step count, the edits done out of the stream
    (``edits 30/100``), the edit rate since this run started (``edits/min``), the estimated time left at that rate
    (``eta``) and the latest evaluation's scores, shortened (``eff 0.97 gen 0.81 loc 0.99``).

    ``--trainer.enable_progress_bar false`` turns it off; a progress bar in ``trainer.callbacks`` replaces it.

    Args:
        refresh_rate: update the bar every this many edit steps.
        leave: keep the finished bar on screen.
    """

    def __init__(self, refresh_rate: int = 1, leave: bool = True) -> None:
        super().__init__(refresh_rate=refresh_rate, leave=leave)
        self._started: float | None = None
        self._edits_at_start = 0

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._started = time.monotonic()
        self._edits_at_start = int(getattr(pl_module, "edits_done", 0))  # a resumed run's rate counts its own edits

    @override
    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        stream = getattr(pl_module, "_stream", None)
        if stream is not None and self._started is not None:
            elapsed = time.monotonic() - self._started
            items.update(edit_progress(int(pl_module.edits_done), len(stream.requests), elapsed, self._edits_at_start))
        for key, value in trainer.callback_metrics.items():
            if key.startswith("val/") and not key.startswith(_HIDDEN):
                name = key.removeprefix("val/")
                items[_SHORT.get(name, name)] = f"{float(value):.3g}"
        return items


def edit_progress(done: int, total: int, elapsed: float, done_at_start: int = 0) -> dict[str, str]:
    """The bar's edit fields: ``edits`` done of ``total``, ``edits/min`` over the ``elapsed`` seconds since the run
    started (with ``done_at_start`` edits already made) and ``eta``, the time the rest takes at that rate.

    Example:
        >>> edit_progress(30, 100, 60.0)
        {'edits': '30/100', 'edits/min': '30', 'eta': '0:02:20'}
    """
    items = {"edits": f"{done}/{total}"}
    made = done - done_at_start
    if made > 0 and elapsed > 0:
        rate = made / elapsed  # edits per second
        items["edits/min"] = f"{rate * 60:.3g}"
        items["eta"] = str(timedelta(seconds=round(max(total - done, 0) / rate)))
    return items
