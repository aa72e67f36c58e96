"""The FLOP floor of the target optimisation: this machine's matmul rates and the upper blocks' parameter count."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from editing.cache import default_cache_dir
from editing.models import EMBEDDED_MODEL, architecture_of, default_mlp_layers, resolve_source


def matmul_flops_per_second(
    m: int = 2048, k: int = 2048, n: int = 2048, dtype: torch.dtype = torch.float32, repeats: int = 5, trials: int = 3
) -> float:
    """Best-of-``trials`` throughput of an ``(m, k) @ (k, n)`` matmul in ``dtype`` (the denominator of the floor)."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = max(best, 2 * m * k * n * repeats / (time.perf_counter() - start))
    return best


def embedded_config() -> PretrainedConfig:
    """The embedded model's config (its shapes; no weights loaded)."""
    return AutoConfig.from_pretrained(resolve_source(EMBEDDED_MODEL, default_cache_dir()))


def mlp_shape() -> tuple[int, int]:
    """``(hidden, intermediate)`` of the embedded model's MLP: the shape of most upper-block matmuls."""
    config = embedded_config()
    return config.hidden_size, config.intermediate_size


def upper_block_params(config_path: Path) -> int:
    """Parameters of the blocks above the shift layer (the last edited one: the config's ``layers``, else the model's
    default): each target iteration costs ~4 FLOPs per parameter and token (forward 2, backward 2: gradients flow to
    activations only, never to weights)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(embedded_config())
    layers = yaml.safe_load(config_path.read_text())["model"]["method"].get("init_args", {}).get("layers")
    shift_layer = (layers or default_mlp_layers(model))[-1]
    blocks = model.get_submodule(architecture_of(model).blocks)
    per_block = sum(p.numel() for p in blocks[0].parameters())
    return per_block * (len(blocks) - shift_layer - 1)
