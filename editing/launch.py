"""What a closed-form editing run can be launched with: the multi-process strategy, and the refused strategies,
precisions and evaluation intervals, one line each, before the model is loaded or anything is edited.

An edit step is a float64 solve on whole weight matrices, not a gradient step: Lightning's mixed precision (autocast
plus a gradient scaler that calls ``optimizer.step`` without its closure) and sharded strategies (FSDP, DeepSpeed:
no rank holds a whole matrix) cannot apply. Several processes run as :class:`EditingDDPStrategy` (``ddp_editing``; the
command line maps ``--trainer.strategy ddp`` to it): Lightning's DDP processes and process group, without the
gradient wrapper, the ranks splitting each step's work themselves (:mod:`editing.distributed`).
"""

from __future__ import annotations

from lightning.pytorch import Trainer
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy, StrategyRegistry
from typing_extensions import override

SUPPORTED_PRECISIONS = ("32-true", "32", "64-true", "64")


class EditingDDPStrategy(DDPStrategy):
    """DDP for editing: one process per device, each with the whole model, no ``DistributedDataParallel`` wrapper.

    The wrapper all-reduces parameter gradients after ``backward``; an edit step has none to reduce (targets are
    optimised on activations, the update is a solve) and the wrapper refuses a module without trainable parameters.
    Instead each rank optimises the targets of its share of the step's requests, the targets are gathered, and every
    rank applies the same float64 solve (:mod:`editing.distributed`); evaluation is sharded the same way.
    """

    strategy_name = "ddp_editing"

    @override
    def configure_ddp(self) -> None:
        """Keep the module unwrapped (see the class docstring)."""


StrategyRegistry.register(
    EditingDDPStrategy.strategy_name,
    EditingDDPStrategy,
    description="DDP for closed-form editing: targets sharded, every rank applies the same solve",
)


def check_launch(trainer: Trainer) -> None:
    """Raise ``ValueError`` naming the trainer argument when the run cannot be done as configured."""
    strategy = trainer.strategy
    if not isinstance(strategy, (SingleDeviceStrategy, EditingDDPStrategy)):
        name = type(strategy).__name__
        if isinstance(strategy, DDPStrategy):
            reason = (
                "its gradient wrapper cannot hold a closed-form edit; use strategy 'ddp_editing' (the command line "
                "maps --trainer.strategy ddp to it), or EditingDDPStrategy() in Python"
            )
        else:
            reason = "closed-form editing needs every edited matrix whole in each process; use 'ddp_editing'"
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
