"""Cross-cutting behaviour of editing runs: reporting (and, later, monitors, PRUNE, WISE merges)."""

from callbacks.report import RunReport

__all__ = ["RunReport"]
