"""EasyEdit hparams files translate into configs the CLI builds, and every field is translated, fixed or ignored.

The fixtures in ``tests/data/easyedit`` follow the layout of EasyEdit's ``hparams/MEMIT/llama-7b.yaml``,
``hparams/AlphaEdit/llama3-8b.yaml`` and ``hparams/WISE/llama-7b.yaml``. Building the CLI mocks out running, as
``tests/test_configs.py`` does: nothing is loaded or written.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from unittest import mock

import pytest
import yaml
from lightning.pytorch.cli import LightningCLI

from callbacks import WiseMemory
from editing import EditDataModule, EditingModule
from editing.easyedit import IGNORED, METHODS, REQUIRED_VALUES, TRANSLATION, main, to_yaml, translate, translate_file
from editing.methods import MEMIT, WISE, AlphaEdit
from main import cli_main

DATA = Path(__file__).resolve().parent / "data" / "easyedit"


def _arguments(cls: type) -> set[str]:
    """Constructor arguments of ``cls``, following ``**kwargs`` up the class hierarchy."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        names |= {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names


@pytest.mark.parametrize("alg", list(TRANSLATION))
def test_every_translation_target_is_an_argument(alg: str) -> None:
    """A renamed argument fails here, not in a user's translated config."""
    method_class = {"MEMIT": MEMIT, "AlphaEdit": AlphaEdit, "WISE": WISE}[alg]
    sections = {"method": method_class, "model": EditingModule, "data": EditDataModule, "WiseMemory": WiseMemory}
    for field, targets in TRANSLATION[alg].items():
        for target in targets if isinstance(targets, tuple) else (targets,):
            section, argument = target.split(".", 1)
            assert argument in _arguments(sections[section]), f"{alg}: {field} -> {target}"
    assert not set(TRANSLATION[alg]) & (set(IGNORED) | set(REQUIRED_VALUES))


def test_memit_hparams_give_the_expected_arguments() -> None:
    translation = translate_file(DATA / "memit_llama-7b.yaml")
    assert translation.method == {
        "class_path": "editing.methods.MEMIT",
        "init_args": {
            "layers": [4, 5, 6, 7, 8],
            "clamp_norm_factor": 4,
            "target_steps": 25,
            "target_lr": 0.5,  # "5e-1" in the file: a string to YAML 1.1
            "weight_decay": 1e-3,
            "kl_factor": 0.0625,
            "mom2_weight": 15000,
        },
    }
    assert translation.model_name == "./hugging_cache/llama-2-7b"
    assert translation.data == {"edits_per_step": 1} and translation.callbacks == []
    assert set(translation.ignored) >= {"device", "stats_dir", "mom2_dataset", "rewrite_module_tmp", "v_loss_layer"}


def test_alphaedit_and_wise_hparams() -> None:
    alphaedit = translate_file(DATA / "alphaedit_llama3-8b.yaml").method["init_args"]
    assert alphaedit["nullspace_threshold"] == 2e-2 and alphaedit["l2"] == 10 and alphaedit["target_lr"] == 0.1
    wise = translate_file(DATA / "wise_llama-7b.yaml")
    args = wise.method["init_args"]
    assert wise.method["class_path"] == "editing.methods.WISE"
    assert (args["lr"], args["steps"], args["mask_density"], args["slack"]) == (1.0, 70, 0.2, 0.88)
    assert (args["irrelevant_margin"], args["edit_margin"], args["gap_margin"]) == (5.0, 20.0, 10.0)
    assert args["module"] == "model.layers.27.mlp.down_proj" and args["ties_density"] == 0.53 and args["replay"] == 0
    assert wise.callbacks == [
        {"class_path": "callbacks.WiseMemory", "init_args": {"save_freq": 500, "merge_freq": 1000, "retrieve": True}}
    ]


def test_unknown_field_is_refused_with_its_name() -> None:
    hparams = yaml.safe_load((DATA / "memit_llama-7b.yaml").read_text())
    with pytest.raises(ValueError, match="'fp16'"):
        translate({**hparams, "fp16": True}, source="x.yaml")
    with pytest.raises(ValueError, match="'nullspace_threshold' has no counterpart for MEMIT"):
        translate({**hparams, "nullspace_threshold": 0.02})  # an AlphaEdit field in a MEMIT file


def test_unsupported_values_and_methods_are_refused() -> None:
    hparams = yaml.safe_load((DATA / "memit_llama-7b.yaml").read_text())
    with pytest.raises(ValueError, match="fact_token: only 'subject_last'"):
        translate({**hparams, "fact_token": "last"})
    with pytest.raises(ValueError, match="alg_name 'ROME' is not translated"):
        translate({**hparams, "alg_name": "ROME"})
    wise = yaml.safe_load((DATA / "wise_llama-7b.yaml").read_text())
    with pytest.raises(ValueError, match="replay true"):
        translate({**wise, "replay": True})
    with pytest.raises(ValueError, match="inner_params: WISE edits one module"):
        translate({**wise, "inner_params": ["model.layers[26].mlp.down_proj.weight", "model.layers[27].mlp.up_proj"]})
    with pytest.raises(ValueError, match="act_margin: expected a list of 3"):
        translate({**wise, "act_margin": [5.0, 20.0]})


@pytest.mark.parametrize("name", sorted(p.name for p in DATA.glob("*.yaml")))
def test_emitted_config_builds_with_the_cli(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The CLI's output is a config ``python main.py fit --config`` builds (running mocked out)."""
    main([str(DATA / name), "--default-root-dir", "runs/translated"])
    config = tmp_path / "translated.yaml"
    config.write_text(capsys.readouterr().out)
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setattr(sys, "argv", ["main.py"])  # pytest's own arguments are not the CLI's
    with mock.patch.object(LightningCLI, "_run_subcommand"):
        # an existing local path stands in for EasyEdit's model path
        cli = cli_main(["fit", "--config", str(config), "--model.model_name", str(tmp_path)])
    assert not any(workdir.iterdir())
    translation = translate_file(DATA / name)
    method = cli.model.method
    assert f"{type(method).__module__.rsplit('.', 1)[0]}.{type(method).__name__}" == translation.method["class_path"]
    assert cli.trainer.default_root_dir == "runs/translated"
    if isinstance(method, WISE):
        (memory,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, WiseMemory)]
        assert (memory.save_freq, memory.merge_freq, memory.retrieve) == (500, 1000, True)
        assert method.module_spec == "model.layers.27.mlp.down_proj" and method.slack == 0.88
    else:
        assert method.layers == [4, 5, 6, 7, 8] and method.mom2_weight == 15000
        assert method.target_kwargs["steps"] == 25


def test_yaml_names_the_ignored_fields() -> None:
    text = to_yaml(translate_file(DATA / "alphaedit_llama3-8b.yaml"), "runs/x", "alphaedit_llama3-8b.yaml")
    assert "#   P_loc: './null_space_project.pt' -- " in text
    assert yaml.safe_load(text)["model"]["method"]["init_args"]["layers"] == [4, 5, 6, 7, 8]


def test_cli_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text((DATA / "memit_llama-7b.yaml").read_text() + "fp16: true\n")
    with pytest.raises(SystemExit) as exit_info:
        main([str(bad)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'fp16'" in err and str(bad) in err
    assert set(METHODS) == set(TRANSLATION)
