"""Sequential (lifelong) knowledge editing of causal language models on PyTorch Lightning."""

from editing.data import EditDataModule
from editing.module import EditingModule
from editing.requests import EditRequest, LocalityProbe, RequestError, read_requests

__all__ = ["EditDataModule", "EditRequest", "EditingModule", "LocalityProbe", "RequestError", "read_requests"]
