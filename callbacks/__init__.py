"""Cross-cutting behaviour of editing runs: reporting, condition-number monitoring, PRUNE restraint."""

from callbacks.condition_number import ConditionNumberMonitor
from callbacks.perplexity import HeldOutPerplexity
from callbacks.prune import PruneRestraint
from callbacks.report import RunReport

__all__ = ["ConditionNumberMonitor", "HeldOutPerplexity", "PruneRestraint", "RunReport"]
