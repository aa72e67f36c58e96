"""EditingModule's inputs (its scores: tests/test_metrics.py, tests/test_fluency.py; runs: tests/test_cli.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from jsonargparse.typing import PositiveInt

from editing.data import EditDataModule
from editing.module import EditingModule


def test_the_stream_is_an_explicit_input():
    with pytest.raises(ValueError, match=r"^stream: EditingModule needs the edit stream"):
        EditingModule(method=SimpleNamespace()).stream
    stream = EditDataModule(limit=3).stream()
    module = EditingModule(method=SimpleNamespace(), stream=stream)
    assert module.stream is stream
    assert "stream" not in module.hparams and module.hparams["token_averaging"] == "case"


def test_hyperparameters_hold_builtin_numbers():
    """jsonargparse passes restricted types (``PositiveInt(5)``); checkpoints must load with ``weights_only=True``."""
    module = EditingModule(method=SimpleNamespace(), fluency_max_length=PositiveInt(5))
    assert type(module.hparams["fluency_max_length"]) is int and type(module.fluency_max_length) is int
