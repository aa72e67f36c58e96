"""EasyEdit hparams -> this project's config, so a MEMIT, AlphaEdit or WISE setting from EasyEdit runs here as is.

    python -m editing.easyedit hparams/MEMIT/llama-7b.yaml > configs/my_method.yaml
    python main.py fit --config configs/my_method.yaml

EasyEdit's hparams files (``hparams/<METHOD>/<model>.yaml``) mix method knobs with plumbing (device, statistics
paths, module-name templates). Every field is accounted for here: :data:`TRANSLATION` maps the knobs to this project's
arguments, :data:`REQUIRED_VALUES` lists the fields whose only supported value is EasyEdit's usual one (another value
would ask for behaviour this project does not have), and :data:`IGNORED` lists the plumbing with the reason it has no
meaning here. A field in none of them is refused with its name, so nothing is silently dropped.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# EasyEdit's ``alg_name`` -> this project's method class.
METHODS = {"MEMIT": "editing.methods.MEMIT", "AlphaEdit": "editing.methods.AlphaEdit", "WISE": "editing.methods.WISE"}

# EasyEdit field -> this project's argument, per method. Targets: ``method.X`` (``model.method.init_args.X``),
# ``model.X``, ``data.X`` and ``WiseMemory.X`` (the ``callbacks.WiseMemory`` callback); a tuple spreads a list over
# several arguments.
_COMMON: dict[str, str | tuple[str, ...]] = {
    "model_name": "model.model_name",
    "batch_size": "data.edits_per_step",  # EasyEdit edits batch_size requests at a time, as one step here
}
_LOCATE_THEN_EDIT: dict[str, str | tuple[str, ...]] = {
    "layers": "method.layers",
    "mom2_update_weight": "method.mom2_weight",  # lambda, the weight of C0 in the solve
    "v_lr": "method.target_lr",
    "v_num_grad_steps": "method.target_steps",
    "v_weight_decay": "method.weight_decay",
    "kl_factor": "method.kl_factor",
    "clamp_norm_factor": "method.clamp_norm_factor",
}
_WISE: dict[str, str | tuple[str, ...]] = {
    "edit_lr": "method.lr",
    "n_iter": "method.steps",
    "mask_ratio": "method.mask_density",
    "act_ratio": "method.slack",
    # the paper's alpha, beta, gamma
    "act_margin": ("method.irrelevant_margin", "method.edit_margin", "method.gap_margin"),
    "alpha": "method.irrelevant_margin",  # EasyEdit's WISEHyperParams spells act_margin out under these names
    "beta": "method.edit_margin",
    "gamma": "method.gap_margin",
    "norm_constraint": "method.norm_constraint",
    "densities": "method.ties_density",  # TIES trim: share of each shard's largest entries kept
    "inner_params": "method.module",  # ["model.layers[27].mlp.down_proj.weight"] -> "model.layers.27.mlp.down_proj"
    "replay": "method.replay",
    "save_freq": "WiseMemory.save_freq",
    "merge_freq": "WiseMemory.merge_freq",
    "retrieve": "WiseMemory.retrieve",
}
_ALPHAEDIT: dict[str, str | tuple[str, ...]] = {"nullspace_threshold": "method.nullspace_threshold", "L2": "method.l2"}
TRANSLATION: dict[str, dict[str, str | tuple[str, ...]]] = {
    "MEMIT": {**_COMMON, **_LOCATE_THEN_EDIT},
    "AlphaEdit": {**_COMMON, **_LOCATE_THEN_EDIT, **_ALPHAEDIT},
    "WISE": {**_COMMON, **_WISE},
}

# Fields whose behaviour is fixed here: EasyEdit's usual value is accepted, any other is refused with the reason.
REQUIRED_VALUES: dict[str, tuple[Any, str]] = {
    "layer_selection": ("all", "every listed layer is edited"),
    "fact_token": ("subject_last", "keys and targets are read at the last subject token"),
    "merge_alg": ("ties", "WISE's shards are merged with TIES"),
    "objective_optimization": ("only_label", "WISE's edit loss is the cross entropy of the target tokens"),
    "weights": (1.0, "TIES weighs the k new shards 1/k (0.4/k and 0.6 with the merged memory, merge_style release)"),
}

# Plumbing with no meaning here, and why.
_TEMPLATES = "module paths come from the architecture table in editing/models.py"
_QWEN3 = "a model-loading knob of EasyEdit's Qwen3 support; loading is editing/models.py's"
IGNORED: dict[str, str] = {
    "alg_name": "chooses model.method.class_path",
    "device": "placement is the trainer's: --trainer.accelerator, --trainer.devices",
    "model_parallel": "placement is the trainer's: --trainer.strategy",
    "stats_dir": "C0 is cached under $EDITING_CACHE, keyed by model, layer, corpus and token count",
    "P_loc": "AlphaEdit's projection is computed from the cached C0 when the run starts, not read from a file",
    "mom2_dataset": "the C0 corpus is method.stats_corpus (default: text sampled from the model, nothing downloaded)",
    "mom2_n_samples": "counts Wikipedia articles; the C0 corpus size here is method.stats_tokens, in tokens",
    "mom2_dtype": "C0 is accumulated and solved in float64",
    "mom2_adjustment": "MEMIT and AlphaEdit always weigh C0 (EasyEdit reads the flag only in ROME)",
    "v_loss_layer": "the target loss is read at the model's output (EasyEdit sets the last block)",
    "rewrite_module_tmp": _TEMPLATES,
    "layer_module_tmp": _TEMPLATES,
    "mlp_module_tmp": _TEMPLATES,
    "attn_module_tmp": _TEMPLATES,
    "ln_f_module": _TEMPLATES,
    "lm_head_module": _TEMPLATES,
    "max_length": "the token limit of EasyEdit's own tokenisation and evaluation; prompts are not truncated here",
    "use_chat_template": "prompts are edited and scored as written; no chat template is applied",
    "save_path": "WISE's memories are in checkpoints/last.ckpt (resume with --ckpt_path)",
    "load_path": "resume with --ckpt_path; WiseMemory.export_dir exports an edited model for load_edited()",
    "padding_side": _QWEN3,
    "enable_thinking": _QWEN3,
    "attn_implementation": _QWEN3,
    "language_model_only": _QWEN3,
}

_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


@dataclass
class Translation:
    """This project's settings for one EasyEdit hparams file.

    Attributes:
        method: ``model.method``: ``{"class_path": ..., "init_args": {...}}``.
        model_name: ``model.model_name`` (EasyEdit's ``model_name``: a path or Hugging Face id), if given.
        data: ``data`` arguments (``edits_per_step``).
        callbacks: ``trainer.callbacks`` (WISE: its ``callbacks.WiseMemory``).
        ignored: the ignored fields, ``field -> (value, reason)``, for the record.
    """

    method: dict[str, Any]
    model_name: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    callbacks: list[dict[str, Any]] = field(default_factory=list)
    ignored: dict[str, tuple[Any, str]] = field(default_factory=dict)

    def config(self, default_root_dir: str) -> dict[str, Any]:
        """The config file ``python main.py fit --config`` reads."""
        trainer: dict[str, Any] = {"default_root_dir": default_root_dir}
        if self.callbacks:
            trainer["callbacks"] = self.callbacks
        model: dict[str, Any] = {"model_name": self.model_name} if self.model_name is not None else {}
        return {"trainer": trainer, "model": {**model, "method": self.method}, "data": self.data}


def translate(hparams: dict[str, Any], source: str = "hparams") -> Translation:
    """Translates the fields of an EasyEdit hparams mapping; ``source`` names it in errors."""
    hparams = {key: _scientific(value) for key, value in hparams.items()}  # EasyEdit reads "5e-1" as a float
    alg = hparams.get("alg_name")
    if alg not in METHODS:
        raise ValueError(f"{source}: alg_name {alg!r} is not translated (supported: {', '.join(METHODS)})")
    table = TRANSLATION[alg]
    init_args: dict[str, Any] = {}
    result = Translation(method={"class_path": METHODS[alg], "init_args": init_args}, data={"edits_per_step": 1})
    wise_memory: dict[str, Any] = {}
    sections = {"method": init_args, "data": result.data, "WiseMemory": wise_memory}
    for name, value in hparams.items():
        if name in IGNORED:
            result.ignored[name] = (value, IGNORED[name])
        elif name in REQUIRED_VALUES:
            accepted, reason = REQUIRED_VALUES[name]
            if value != accepted:
                raise ValueError(f"{source}: {name}: only {accepted!r} is supported ({reason}), got {value!r}")
        elif name in table:
            targets = table[name]
            values = _CONVERT.get(name, _keep)(value, f"{source}: {name}")
            if isinstance(targets, tuple):
                if not isinstance(values, list) or len(values) != len(targets):
                    raise ValueError(f"{source}: {name}: expected a list of {len(targets)} numbers, got {value!r}")
            else:
                targets, values = (targets,), [values]
            for target, item in zip(targets, values):
                section, argument = target.split(".", 1)
                if section == "model":
                    result.model_name = item
                else:
                    sections[section][argument] = item
        else:
            raise ValueError(
                f"{source}: field '{name}' has no counterpart for {alg} here and is not a known EasyEdit field to "
                "ignore (see editing.easyedit.TRANSLATION and IGNORED)"
            )
    if alg == "WISE":  # EasyEdit's WISE always shards and merges; here WiseMemory schedules that
        result.callbacks = [{"class_path": "callbacks.WiseMemory", "init_args": wise_memory}]
    return result


def translate_file(path: str | Path) -> Translation:
    """Reads and translates an EasyEdit hparams YAML file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such hparams file")
    try:
        hparams = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(hparams, dict):
        raise ValueError(f"{path}: expected a mapping of EasyEdit hparams fields")
    return translate(hparams, source=str(path))


def to_yaml(translation: Translation, default_root_dir: str, source: str) -> str:
    """The config file text, headed by where it came from and what was ignored (as comments)."""
    lines = [f"# Translated from EasyEdit's {source} by `python -m editing.easyedit`.", "# Ignored fields:"]
    lines += [f"#   {name}: {value!r} -- {reason}" for name, (value, reason) in translation.ignored.items()]
    body = yaml.dump(translation.config(default_root_dir), Dumper=_Dumper, sort_keys=False)
    return "\n".join(lines) + "\n" + body


class _Dumper(yaml.SafeDumper):
    """Block style, except lists of scalars on one line (``layers: [4, 5, 6, 7, 8]``), as the shipped configs."""


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    """Flow style for lists of scalars only (the WISE callback list stays in block style)."""
    flow = all(not isinstance(item, dict | list) for item in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def _scientific(value: Any) -> Any:
    """YAML 1.1 reads ``5e-1`` (no dot) as a string; EasyEdit converts such strings to floats, so do we."""
    return float(value) if isinstance(value, str) and _FLOAT.match(value) else value


def _keep(value: Any, where: str) -> Any:
    """Most fields carry over unchanged."""
    return value


def _module(value: Any, where: str) -> str:
    """``inner_params`` (a list of one weight name, brackets for indices) -> a module path."""
    names = value if isinstance(value, list) else [value]
    if len(names) != 1 or not isinstance(names[0], str):
        raise ValueError(f"{where}: WISE edits one module here, got {value!r}")
    path = re.sub(r"\[(\d+)\]", r".\1", names[0])
    return re.sub(r"\.(weight|bias)$", "", path)


def _replay(value: Any, where: str) -> int:
    """EasyEdit's ``replay`` is a switch (one edit of every sealed memory per iteration); here it counts edits."""
    if value is False or value is None:
        return 0
    raise ValueError(
        f"{where}: replay true has no exact counterpart (EasyEdit replays one edit of each sealed memory per "
        "iteration); set model.method.init_args.replay to the number of old edits to replay per step instead"
    )


def _save_freq(value: Any, where: str) -> int:
    """EasyEdit allows ``save_freq: null`` (one memory); WiseMemory always shards, so that setting cannot carry over."""
    if value is None:
        raise ValueError(f"{where}: null (one memory, never merged) has no counterpart; set save_freq and merge_freq")
    return value


_CONVERT: dict[str, Callable[[Any, str], Any]] = {"inner_params": _module, "replay": _replay, "save_freq": _save_freq}


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m editing.easyedit``: the config on stdout; a refused field is one line on stderr, exit status 2."""
    parser = argparse.ArgumentParser(prog="python -m editing.easyedit", description=__doc__.split("\n\n")[0])
    parser.add_argument("hparams", type=Path, help="an EasyEdit hparams YAML file (MEMIT, AlphaEdit or WISE)")
    parser.add_argument(
        "--default-root-dir", help="trainer.default_root_dir of the runs (default: runs/easyedit_<file name>)"
    )
    args = parser.parse_args(argv)
    try:
        translation = translate_file(args.hparams)
    except ValueError as err:  # one clear line naming the file and field, no traceback
        parser.exit(2, f"error: {err}\n")
    root = args.default_root_dir or f"runs/easyedit_{args.hparams.stem}"
    sys.stdout.write(to_yaml(translation, root, str(args.hparams)))


if __name__ == "__main__":
    main()
