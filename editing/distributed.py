"""Work split across the processes of a multi-process (DDP) editing run, and the exchanges that join it again.

Every rank holds the whole model and reads the whole stream (:class:`editing.data.WholeStreamSampler`); what is split
is the work inside a step or an evaluation: each rank takes a contiguous share of the requests (:func:`share`), and
its results are gathered in rank order (:func:`gather_columns`, :func:`gather_lists`), so the gathered whole is in
the order a single process would have produced. Every function is the identity in a single process, so the methods
call them unconditionally. On-disk caches that one process writes and the others read are guarded by
:func:`machine_lock`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from filelock import FileLock

T = TypeVar("T")


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of this process; ``(0, 1)`` outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_local_zero() -> bool:
    """Whether this process is the first on its machine (Lightning's launchers set ``LOCAL_RANK`` for the others)."""
    return int(os.environ.get("LOCAL_RANK", "0")) == 0


def share_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s contiguous share of ``n`` items: sizes differ by at most one."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def share(items: Sequence[T]) -> Sequence[T]:
    """This rank's contiguous share of ``items`` (all of them in a single process)."""
    start, stop = share_bounds(len(items), *rank_and_world())
    return items[start:stop]


def gather_columns(local: torch.Tensor, total: int) -> torch.Tensor:
    """``(d, total)``: every rank's ``(d, n_rank)`` columns, in rank order (the shares of :func:`share` of ``total``
    items). Collective: every rank must call it."""
    rank, world = rank_and_world()
    if world == 1:
        return local
    sizes = [share_bounds(total, r, world) for r in range(world)]
    width = max(stop - start for start, stop in sizes)
    padded = local.new_zeros(local.shape[0], width)
    padded[:, : local.shape[1]] = local
    pieces = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(pieces, padded.contiguous())
    return torch.cat([piece[:, : stop - start] for piece, (start, stop) in zip(pieces, sizes, strict=True)], dim=1)


def gather_lists(local: list[T]) -> list[T]:
    """Every rank's list, concatenated in rank order (picklable items). Collective."""
    _, world = rank_and_world()
    if world == 1:
        return local
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, local)
    return [item for part in parts for item in part]


def sum_across(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over the ranks, in place (a float64 or integer tensor keeps sums of counts exact)."""
    if rank_and_world()[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_across(flag: bool) -> bool:
    """Whether ``flag`` holds on some rank (so that every rank takes the same branch of a collective)."""
    if rank_and_world()[1] == 1:
        return flag
    value = torch.tensor([int(flag)], dtype=torch.long)
    if dist.get_backend() == "nccl":
        value = value.cuda()
    return bool(sum_across(value).item())


def replicas_agree(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether every rank holds the same values: one all-reduce of a float64 checksum per tensor (min and max)."""
    if rank_and_world()[1] == 1:
        return True
    sums = torch.stack([f(t.detach().double()) for f in (torch.sum, lambda x: x.abs().sum()) for t in tensors])
    low, high = sums.clone(), sums.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return bool(torch.equal(low, high))


@contextlib.contextmanager
def machine_lock(path: Path) -> Iterator[None]:
    """Hold the lock file ``<path>.lock`` (processes of one machine, or of several sharing the directory, take turns):
    the first to enter builds a cache entry, the others wait and then find it built."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        yield
