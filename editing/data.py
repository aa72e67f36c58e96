"""The edit stream as a LightningDataModule: requests in a fixed, seeded order, ``edits_per_step`` per training batch.

Training batches are lists of ``(stream_index, EditRequest)``; validation batches cover the whole stream, and the
module scores only the requests edited so far (all of them before the first edit, for the unedited baseline).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from jsonargparse.typing import PositiveInt
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, DistributedSampler

from editing.arguments import check_arguments
from editing.requests import EditRequest, builtin_requests, detect_format, read_requests

IndexedRequest = tuple[int, EditRequest]
MetricFamily = Literal["counterfact", "token"]
Scored = Literal["edited", "all"]


def _as_batch(items: list[IndexedRequest]) -> list[IndexedRequest]:
    return items


class WholeStreamSampler(DistributedSampler):
    """Every rank reads the whole stream in order: the ranks of a multi-process run split the work inside each edit
    step and evaluation batch (:mod:`editing.distributed`), not the batches. Being a ``DistributedSampler``, Lightning
    keeps it instead of injecting one that would give each rank other edits (and pad with repeated ones)."""

    def __init__(self, items: Sequence[IndexedRequest]) -> None:
        super().__init__(items, num_replicas=1, rank=0, shuffle=False)


class StreamLoader(DataLoader):
    """The training stream: remembers how many batches were consumed, so a run resumed from a mid-stream checkpoint
    continues at the next edit instead of re-applying the stream from its start (Lightning reads ``state_dict``)."""

    def __init__(self, items: list[IndexedRequest], batch_size: int) -> None:
        super().__init__(items, batch_size=batch_size, sampler=WholeStreamSampler(items), collate_fn=_as_batch)
        self._skip = 0
        self._consumed = 0

    def __iter__(self):
        skip, self._skip = self._skip, 0
        self._consumed = skip
        for index, batch in enumerate(super().__iter__()):
            if index < skip:
                continue
            self._consumed = index + 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"batches_consumed": self._consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = state.get("batches_consumed", 0)


@dataclass(frozen=True)
class EditStream:
    """What a run edits and how it is scored, fixed once the data module has read its requests.

    The module receives this description (the CLI links it into ``model.stream``) and callbacks read it there, so
    nothing reaches through the trainer into the data module for it.

    Attributes:
        requests: the edit requests in stream order (edit step ``k`` edits the ``k``-th group of ``edits_per_step``).
        metric_family: ``counterfact`` or ``token``, resolved from the data module's ``metric_family``.
        stream_id: fingerprint of the ordered stream (case ids and targets), recorded with every result and checkpoint.
        source: the request file, ``built-in``, or ``in-memory`` (:meth:`EditDataModule.from_requests`).
        edits_per_step: requests edited together in one step.
        start: requests before this position were edited by earlier runs on the same module (consecutive
            ``Editor.edit`` calls continue one stream); this run edits from here on.
        scored: what an evaluation scores: ``edited``, the requests edited so far (every one before the first edit:
            the unedited baseline), or ``all``, every request whether edited or not (``Editor.evaluate(requests)``).
    """

    requests: tuple[EditRequest, ...]
    metric_family: MetricFamily
    stream_id: str
    source: str
    edits_per_step: int
    start: int = 0
    scored: Scored = "edited"


class EditDataModule(LightningDataModule):
    """Edit requests from a file (or the built-in set) as a sequential stream.

    Args:
        path: request file; ``None`` uses the project's built-in counterfactual set (no files needed).
        format: layout of ``path``: ``auto`` (by suffix and keys), ``counterfact``, ``zsre``, ``easyedit`` or ``jsonl``.
        limit: use only the first ``limit`` records of the file.
        edits_per_step: requests edited together in one step (one Lightning training step).
        shuffle: stream the requests in a seeded random order instead of file order.
        seed: seed of that order.
        eval_batch_size: requests per validation batch.
        metric_family: ``counterfact`` (probability comparisons against ``target_true``), ``token`` (teacher-forced
            token accuracy, ZsRE), or ``auto`` (``token`` for ZsRE files, ``counterfact`` when every request has
            ``target_true``, else ``token``).
    """

    @check_arguments
    def __init__(
        self,
        path: str | None = None,
        format: Literal["auto", "counterfact", "zsre", "easyedit", "jsonl"] = "auto",
        limit: PositiveInt | None = None,
        edits_per_step: PositiveInt = 1,
        shuffle: bool = False,
        seed: int = 0,
        eval_batch_size: PositiveInt = 16,
        metric_family: Literal["auto", "counterfact", "token"] = "auto",
    ) -> None:
        super().__init__()
        self.path = path
        self.format = format
        self.limit = limit
        self.edits_per_step = edits_per_step
        self.shuffle = shuffle
        self.seed = seed
        self.eval_batch_size = eval_batch_size
        self.requested_family = metric_family
        self._stream: EditStream | None = None  # read by setup, or by the first stream()
        self._given: tuple[tuple[EditRequest, ...], int, Scored] | None = None  # from_requests: requests, start, scored

    @classmethod
    def from_requests(
        cls,
        requests: Sequence[EditRequest],
        edits_per_step: int = 1,
        start: int = 0,
        scored: Scored = "edited",
        eval_batch_size: int = 16,
        metric_family: Literal["auto", "counterfact", "token"] = "auto",
    ) -> EditDataModule:
        """A stream of requests already in memory (the Python API, :class:`editing.api.Editor`).

        Args:
            requests: the whole stream, in order, including the ``start`` requests edited by earlier runs.
            edits_per_step, eval_batch_size, metric_family: as for the constructor.
            start, scored: see :class:`EditStream`.
        """
        data = cls(edits_per_step=edits_per_step, eval_batch_size=eval_batch_size, metric_family=metric_family)
        if not 0 <= start <= len(requests):
            raise ValueError(f"start: expected 0..{len(requests)}, got {start}")
        data._given = (tuple(requests), start, scored)
        return data

    def setup(self, stage: str) -> None:
        self.stream()

    def stream(self) -> EditStream:
        """The edit stream, read on first use (``setup`` reads it too; reading twice returns the same stream), so
        it can be handed to the module before the trainer runs; bad requests fail here, before anything is written."""
        if self._stream is None:
            self._stream = self._read()
        return self._stream

    def _read(self) -> EditStream:
        start, scored = 0, "edited"
        if self._given is not None:
            requests, start, scored = list(self._given[0]), self._given[1], self._given[2]
        elif self.path is None:
            requests = builtin_requests(self.limit)
        else:
            requests = read_requests(self.path, self.format, self.limit)
        if not requests:
            where = "requests: the list" if self._given is not None else f"data.path: '{self.path}'"
            raise ValueError(f"{where} holds no edit requests")
        if self.shuffle:
            order = torch.randperm(len(requests), generator=torch.Generator().manual_seed(self.seed)).tolist()
            requests = [requests[i] for i in order]
        digest = hashlib.sha256("\n".join(f"{r.case_id}\t{r.target_new}" for r in requests).encode())
        return EditStream(
            requests=tuple(requests),
            metric_family=self._resolve_family(requests),
            stream_id=digest.hexdigest()[:16],
            source="in-memory" if self._given is not None else self.path or "built-in",
            edits_per_step=self.edits_per_step,
            start=start,
            scored=scored,
        )

    def _resolve_family(self, requests: list[EditRequest]) -> MetricFamily:
        if self.requested_family != "auto":
            return self.requested_family
        if self.path is not None and (self.format if self.format != "auto" else detect_format(self.path)) == "zsre":
            return "token"
        return "counterfact" if all(r.target_true for r in requests) else "token"

    @property
    def requests(self) -> tuple[EditRequest, ...]:
        """The requests in stream order (see :class:`EditStream`)."""
        return self.stream().requests

    @property
    def metric_family(self) -> MetricFamily:
        """The resolved metric family (see :class:`EditStream`)."""
        return self.stream().metric_family

    @property
    def stream_id(self) -> str:
        """Fingerprint of the ordered stream (see :class:`EditStream`)."""
        return self.stream().stream_id

    def train_dataloader(self) -> DataLoader:
        return StreamLoader(list(enumerate(self.requests))[self.stream().start :], self.edits_per_step)

    def val_dataloader(self) -> DataLoader:
        items = list(enumerate(self.requests))
        return DataLoader(items, self.eval_batch_size, sampler=WholeStreamSampler(items), collate_fn=_as_batch)

    def state_dict(self) -> dict:
        return {"stream_id": self.stream_id, "edits_per_step": self.edits_per_step}

    def load_state_dict(self, state: dict) -> None:
        if state.get("stream_id") not in (None, self.stream_id):
            raise ValueError(
                f"data: the checkpoint was made on another edit stream ({state['stream_id']} != {self.stream_id}); "
                "resume with the same data.path, format, limit, shuffle and seed"
            )
