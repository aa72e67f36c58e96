"""Sequential (lifelong) knowledge editing of causal language models on PyTorch Lightning."""

from editing.api import Editor
from editing.data import EditDataModule, EditStream
from editing.module import EditingModule
from editing.requests import EditRequest, LocalityProbe, RequestError, read_requests

__all__ = [
    "EditDataModule",
    "Editor",
    "EditRequest",
    "EditStream",
    "EditingModule",
    "LocalityProbe",
    "RequestError",
    "read_requests",
]
