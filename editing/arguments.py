"""Argument validation in the types: ranges and closed choices are written in the constructor signatures.

Ranged numbers are ``jsonargparse.typing`` restricted types (``PositiveInt``, ``ClosedUnitInterval``, ... and the few
below) and closed choices are ``Literal[...]``, so the command line rejects a bad value while it parses, naming the
argument, and ``--help`` shows the type. :func:`check_arguments` gives direct Python construction the same checks from
the same annotations, so no constructor writes ``if steps < 1: raise ...`` by hand.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, TypeVar, Union

import jsonargparse
import yaml
from jsonargparse import ArgumentParser, Namespace
from jsonargparse.typing import restricted_number_type

PositiveFraction = restricted_number_type("PositiveFraction", float, [(">", 0.0), ("<=", 1.0)])
"""A float in ``(0, 1]``: a share of entries that must keep at least one."""

GreaterThanOne = restricted_number_type("GreaterThanOne", float, (">", 1.0))
"""A float ``> 1``, e.g. the base of a logarithm that must grow."""

Init = TypeVar("Init", bound=Callable[..., None])

# jsonargparse 4.49 renamed dump's ``skip_none`` to ``skip_unset``; both keep the None values (``norm_constraint: null``
# is a choice, not an absent value).
_KEEP_NONE = (
    {"skip_unset": False}
    if tuple(int(p) for p in jsonargparse.__version__.split(".")[:2]) >= (4, 49)
    else {"skip_none": False}
)


def plain_config(parser: ArgumentParser, config: Namespace) -> dict[str, Any]:
    """``config`` as the YAML file jsonargparse writes holds it: builtin numbers, strings, lists and dicts only (not
    ``PositiveInt`` or ``Path`` objects), so it goes into a ``torch.load(weights_only=True)`` checkpoint and to every
    logger as data."""
    return yaml.safe_load(parser.dump(config, **_KEEP_NONE))


def check_arguments(init: Init) -> Init:
    """Decorate an ``__init__`` so that its arguments are checked against their annotations before it runs.

    Restricted number types (``PositiveInt``, ...), ``Literal[...]`` choices, unions of them (``PositiveFloat | None``)
    and lists of them are checked; a value that does not conform raises a ``ValueError`` that starts with the
    argument's name. Values of a restricted type, as jsonargparse passes them, reach ``__init__`` as plain
    ``int``/``float``, so hyperparameters and checkpoints hold builtin numbers only (``torch.load(weights_only=True)``
    works). Other annotations are left to jsonargparse (at parse time) and to the code that uses the value.
    """
    signature = inspect.signature(init)
    variadic = {p.name for p in signature.parameters.values() if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}

    @functools.wraps(init)
    def checked(*args: Any, **kwargs: Any) -> None:
        bound = signature.bind(*args, **kwargs)
        hints = _hints(init)
        for name, value in bound.arguments.items():
            if name not in hints or name in variadic:
                continue
            expected = _mismatch(hints[name], value)
            if expected is not None:
                raise ValueError(f"{name}: expected {expected}, got {value!r}")
            bound.arguments[name] = _builtin(value)
        init(*bound.args, **bound.kwargs)

    return typing.cast(Init, checked)


@functools.cache
def _hints(init: Callable[..., None]) -> dict[str, Any]:
    """The evaluated annotations of ``init`` (resolved on first call, when every name of its module exists)."""
    return typing.get_type_hints(init)


def _is_restricted(annotation: Any) -> bool:
    return isinstance(annotation, type) and hasattr(annotation, "_expression") and hasattr(annotation, "_type")


def _mismatch(annotation: Any, value: Any) -> str | None:
    """``None`` when ``value`` conforms to ``annotation`` (or the annotation is not one this module checks), else what
    the annotation expects, in words."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = typing.get_args(annotation)
        return None if value in choices else "one of " + ", ".join(repr(c) for c in choices)
    if origin in (Union, types.UnionType):
        expected = [_mismatch(member, value) for member in typing.get_args(annotation)]
        return None if None in expected else " or ".join(expected)
    if annotation is type(None):
        return None if value is None else "None"
    if origin is list and isinstance(value, list | tuple):
        (item,) = typing.get_args(annotation)
        expected = next((e for e in (_mismatch(item, v) for v in value) if e is not None), None)
        return None if expected is None else f"a list of {expected}"
    if _is_restricted(annotation):
        base = annotation._type
        number = (int, float) if base is float else (base,)
        words = f"{annotation.__name__} ({annotation._expression})"
        if isinstance(value, bool) or not isinstance(value, number):
            return words
        try:
            annotation(value)
        except ValueError:
            return words
    return None


def _builtin(value: Any) -> Any:
    """A value of a restricted type as its builtin base type (``PositiveInt(3)`` -> ``3``), also inside a list; others
    unchanged."""
    if isinstance(value, list):
        return [_builtin(v) for v in value]
    return type(value)._type(value) if _is_restricted(type(value)) else value
