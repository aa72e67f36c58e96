"""Cross-cutting behaviour of editing runs: reporting, the progress bar, the resume checkpoint, condition-number
monitoring, PRUNE restraint, general ability and held-out perplexity along the stream, WISE memory management, routing
diagnostics and evaluation samples for W&B."""

from callbacks.checkpoint import RunCheckpoint
from callbacks.condition_number import ConditionNumberMonitor
from callbacks.eval_samples import EvalSamples
from callbacks.general_ability import GeneralAbility
from callbacks.original_weights import OriginalWeights
from callbacks.perplexity import HeldOutPerplexity
from callbacks.progress import EditProgressBar
from callbacks.prune import PruneRestraint
from callbacks.report import RunReport
from callbacks.routing_monitor import RoutingMonitor
from callbacks.wise_memory import WiseMemory

__all__ = [
    "ConditionNumberMonitor",
    "EditProgressBar",
    "EvalSamples",
    "GeneralAbility",
    "HeldOutPerplexity",
    "OriginalWeights",
    "PruneRestraint",
    "RoutingMonitor",
    "RunCheckpoint",
    "RunReport",
    "WiseMemory",
]
