"""Tests for editing.methods.base: the binding every method shares (the solver is tested in test_memit.py)."""

from __future__ import annotations

import pytest

from editing.methods import MEMIT, FineTune


@pytest.mark.parametrize("kind", ["memit", "ft"])
def test_setup_binds_the_model_once_for_every_method(kind, tiny_llama, char_tokenizer, method_kwargs, bind):
    method = MEMIT(**method_kwargs) if kind == "memit" else FineTune(layer=1)
    with pytest.raises(RuntimeError, match="not bound to a model yet"):
        method.model
    bind(method, tiny_llama)
    assert method.model is tiny_llama and method.tokenizer is char_tokenizer
    assert all(module is not tiny_llama for module in method.modules())  # not a submodule: not in the method's state
    assert not any(key.startswith("model.") for key in method.state_dict())
    assert set(method.edited_weights()) <= {name for name, _ in tiny_llama.named_modules()}
