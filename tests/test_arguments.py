"""Argument validation in the types: ``check_arguments`` on direct construction, jsonargparse on the command line."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Literal

import pytest
from jsonargparse.typing import PositiveFloat, PositiveInt

from callbacks import ConditionNumberMonitor, HeldOutPerplexity, PruneRestraint, RunCheckpoint, WiseMemory
from editing.arguments import GreaterThanOne, PositiveFraction, check_arguments
from editing.data import EditDataModule
from editing.methods import MEMIT, WISE, AlphaEdit, FineTune, LyapLock
from editing.module import EditingModule


class _Settings:
    @check_arguments
    def __init__(
        self,
        steps: PositiveInt = 1,
        bound: PositiveFloat | None = None,
        base: GreaterThanOne | Literal["e"] = "e",
        share: PositiveFraction = 0.5,
        mode: Literal["a", "b"] = "a",
        layers: list[PositiveInt] | None = None,
        free: int = 0,
        *rest: object,
        **extra: object,
    ) -> None:
        self.values = dict(steps=steps, bound=bound, base=base, share=share, mode=mode, layers=layers, free=free)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": 0}, r"^steps: expected PositiveInt \(v>0\), got 0$"),
        ({"steps": 2.0}, r"^steps: expected PositiveInt"),  # an int type takes ints only
        ({"steps": True}, r"^steps: expected PositiveInt"),  # not a bool
        ({"steps": "3"}, r"^steps: expected PositiveInt"),
        ({"bound": -1.0}, r"^bound: expected PositiveFloat \(v>0\) or None, got -1.0$"),
        ({"base": 1.0}, r"^base: expected GreaterThanOne \(v>1.0\) or one of 'e', got 1.0$"),
        ({"base": "pi"}, r"^base: expected GreaterThanOne"),
        ({"share": 0.0}, r"^share: expected PositiveFraction"),
        ({"share": 1.5}, r"^share: expected PositiveFraction"),
        ({"mode": "c"}, r"^mode: expected one of 'a', 'b', got 'c'$"),
        ({"layers": [1, 0]}, r"^layers: expected a list of PositiveInt"),
    ],
)
def test_values_outside_the_annotation_are_rejected_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _Settings(**kwargs)


def test_values_inside_the_annotation_reach_init_as_builtin_numbers():
    settings = _Settings(PositiveInt(3), bound=2, base=PositiveFloat(2.5), share=1, mode="b", layers=[PositiveInt(2)])
    assert settings.values == dict(steps=3, bound=2, base=2.5, share=1, mode="b", layers=[2], free=0)
    assert type(settings.values["steps"]) is int and type(settings.values["base"]) is float
    assert type(settings.values["layers"][0]) is int
    assert _Settings(free=-5, extra="anything").values["free"] == -5  # other annotations are not checked here


@pytest.mark.parametrize(
    ("build", "name"),
    [
        (lambda: MEMIT(stop_prob=1.5), "stop_prob"),
        (lambda: LyapLock(target_steps=0), "target_steps"),  # the base's arguments, through **kwargs
        (lambda: AlphaEdit(l2=-1.0), "l2"),
        (lambda: FineTune(stop_loss=-1.0), "stop_loss"),
        (lambda: WISE(mask_density=0.0), "mask_density"),
        (lambda: WISE(prefixes=11), "prefixes"),
        (lambda: WISE(merge_style="fold"), "merge_style"),
        (lambda: PruneRestraint(niter=-1), "niter"),
        (lambda: ConditionNumberMonitor(every_n_steps=0), "every_n_steps"),
        (lambda: HeldOutPerplexity(batch_size=0), "batch_size"),
        (lambda: WiseMemory(save_freq=0), "save_freq"),
        (lambda: RunCheckpoint(every_n_train_steps=-1), "every_n_train_steps"),
        (lambda: EditingModule(method=SimpleNamespace(), fluency_max_length=0), "fluency_max_length"),
        (lambda: EditingModule(method=SimpleNamespace(), dtype="float64"), "dtype"),
        (lambda: EditDataModule(edits_per_step=0), "edits_per_step"),
        (lambda: EditDataModule(limit=0), "limit"),
    ],
)
def test_every_constructor_checks_its_annotations(build, name):
    with pytest.raises(ValueError, match=f"^{name}:"):
        build()
