"""Editing methods: one file per method on the shared base."""

from editing.methods.alphaedit import AlphaEdit
from editing.methods.base import EditMethod, LocateThenEdit
from editing.methods.ft import FineTune
from editing.methods.lyaplock import LyapLock
from editing.methods.memit import MEMIT
from editing.methods.wise import WISE

__all__ = ["AlphaEdit", "EditMethod", "FineTune", "LocateThenEdit", "LyapLock", "MEMIT", "WISE"]
