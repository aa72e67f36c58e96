"""What a closed-form editing run can be launched with: refused strategies, precisions and evaluation intervals, one
line each, before the model is loaded or anything is edited.

An edit step is a float64 solve on whole weight matrices, not a gradient step: Lightning's mixed precision (autocast
plus a gradient scaler that calls ``optimizer.step`` without its closure) and sharded strategies (FSDP, DeepSpeed:
no rank holds a whole matrix) cannot apply. Multi-process data parallelism needs every rank to apply the same update
from the gathered targets (issue 12); until then a DDP launch is refused rather than left to diverge silently.
"""

from __future__ import annotations

from lightning.pytorch import Trainer
from lightning.pytorch.strategies import SingleDeviceStrategy

SUPPORTED_PRECISIONS = ("32-true", "32", "64-true", "64")


def check_launch(trainer: Trainer) -> None:
    """Raise ``ValueError`` naming the trainer argument when the run cannot be done as configured."""
    strategy = trainer.strategy
    if not isinstance(strategy, SingleDeviceStrategy):
        name = type(strategy).__name__
        if "DDP" in name:
            reason = (
                "multi-process editing is not implemented yet: each rank would apply its own update and the replicas "
                "would diverge; run one process (--trainer.devices 1)"
            )
        else:
            reason = "closed-form editing needs every edited matrix whole in one process; use --trainer.devices 1"
        raise ValueError(f"trainer.strategy: {name} ({trainer.world_size} processes) is not supported: {reason}")
    interval = trainer.val_check_interval
    if isinstance(interval, (int, float)) and interval <= 0:
        raise ValueError(
            f"trainer.val_check_interval: {interval} never evaluates; give N >= 1 edit steps between evaluations, "
            "or leave it out to evaluate once, after the last edit"
        )
    precision = str(trainer.precision)
    if precision not in SUPPORTED_PRECISIONS:
        raise ValueError(
            f"trainer.precision: '{precision}' cannot apply to closed-form editing (the update is a float64 solve, "
            "not a gradient step); choose the model's dtype with --model.dtype bfloat16 and the target "
            "optimisation's with --model.method.init_args.target_precision"
        )
