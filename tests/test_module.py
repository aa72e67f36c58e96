"""EditingModule's inputs (its scores: tests/test_metrics.py, tests/test_fluency.py; runs: tests/test_cli.py)."""

from __future__ import annotations

import csv
import json
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from helpers import tiny_fit_args, tiny_ft_args
from jsonargparse.typing import PositiveInt
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.trainer.states import TrainerFn

from editing.data import EditDataModule
from editing.methods import FineTune, LyapLock
from editing.models import load_model
from editing.module import EditingModule
from editing.requests import EditRequest
from editing.rows import check_lengths
from main import cli_main


def test_the_stream_is_an_explicit_input():
    with pytest.raises(ValueError, match=r"^stream: EditingModule needs the edit stream"):
        EditingModule(method=SimpleNamespace()).stream
    stream = EditDataModule(limit=3).stream()
    module = EditingModule(method=SimpleNamespace(), stream=stream)
    assert module.stream is stream
    assert "stream" not in module.hparams and module.hparams["token_averaging"] == "case"


def test_hyperparameters_hold_builtin_numbers():
    """jsonargparse passes restricted types (``PositiveInt(5)``); checkpoints must load with ``weights_only=True``."""
    module = EditingModule(method=SimpleNamespace(), fluency_max_length=PositiveInt(5))
    assert type(module.hparams["fluency_max_length"]) is int and type(module.fluency_max_length) is int


# -- retention sample: periodic evaluations score a fixed, seeded sample; the last one every edit ---------------------
def test_periodic_evaluations_score_a_seeded_sample_and_the_last_every_edit(tiny_run, tiny_run_requests):
    records = [{**r, "case_id": f"{r['case_id']}-{k}"} for k in range(2) for r in tiny_run_requests]  # 6 edits
    tiny_run["data"].write_text("\n".join(json.dumps(r) for r in records))
    cli_main(tiny_ft_args(tiny_run, tiny_run["root"], "--model.eval_sample", "2"))
    rows = list(csv.DictReader(next(tiny_run["root"].glob("csv/version_*/metrics.csv")).open()))
    scored = [(float(r["edits/total"]), float(r["val/scored_edits"])) for r in rows if r.get("val/scored_edits")]
    assert scored == [(1, 1), (2, 2), (3, 2), (4, 2), (5, 2), (6, 6)]  # the stream's end: all of them
    last = [r for r in rows if r.get("val/efficacy")][-1]
    by_age = [float(last[f"val/efficacy_by_age/fifth_{g}"]) for g in range(1, 6)]
    sizes = [2, 1, 1, 1, 1]  # places 0-5 of 6 edits in fifths: 0 0 1 2 3 4
    assert sum(s * e for s, e in zip(sizes, by_age)) / 6 == pytest.approx(float(last["val/efficacy"]))


def test_efficacy_by_age_splits_the_edits_made_so_far_in_fifths_oldest_first():
    module = EditingModule(method=SimpleNamespace())
    hits = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    module._update_by_age(list(range(12)), hits, done=10)  # places 10 and 11 are not edited yet: left out
    by_age = [float(m.compute()) for m in module.val_efficacy_by_age.values()]
    assert by_age == [1.0, 0.5, 0.5, 0.0, 0.0]
    module = EditingModule(method=SimpleNamespace())
    module._update_by_age([0, 1], hits[:2], done=10)  # a sample without the later fifths: NaN, not left out
    by_age = [float(m.compute()) for m in module.val_efficacy_by_age.values()]
    assert by_age[0] == 1.0 and all(v != v for v in by_age[1:])


def test_sample_is_fixed_by_its_seed():
    stream = EditDataModule(limit=20).stream()
    places = []
    for seed in (0, 0, 1):
        module = EditingModule(method=SimpleNamespace(), stream=stream, eval_sample=5, eval_seed=seed)
        module.edits_done += 12
        module._trainer = SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.FITTING), max_steps=-1, global_step=12)
        cut = module._sample_cut()
        places.append([i for i in range(12) if int(module._ranks[i]) < cut])
    assert len(places[0]) == 5 and places[0] == places[1] and places[0] != places[2]


def test_a_sample_larger_than_the_stream_is_refused():
    with pytest.raises(ValueError, match=r"^eval_sample: 50 is larger than the stream \(3 edits\)"):
        EditingModule(method=SimpleNamespace(), stream=EditDataModule(limit=3).stream(), eval_sample=50)


# -- requests the model cannot take -----------------------------------------------------------------------------------
def test_a_request_longer_than_the_model_positions_is_refused_naming_it(char_tokenizer):
    config = SimpleNamespace(max_position_embeddings=64)
    fine = EditRequest(case_id="ok", prompt="The home of {} is", subject="Ann", target_new="Rome")
    check_lengths([fine], char_tokenizer, config, ["Hi there. {}"])
    long = EditRequest(case_id="big", prompt="The home of {} is", subject="x" * 200_000, target_new="Rome")
    with pytest.raises(ValueError, match=r"^request 1 \(case_id big\): field 'prompt \+ target_new' needs 20\d{4}"):
        check_lengths([fine, long], char_tokenizer, config)
    near = EditRequest(case_id="near", prompt="{} is", subject="y" * 50, target_new="Rome", rephrase_prompts=["z" * 60])
    with pytest.raises(ValueError, match=r"^request 0 \(case_id near\): field 'rephrase_prompts\[0\]' needs 65"):
        check_lengths([near], char_tokenizer, config)


def test_cli_refuses_a_giant_subject_before_editing(tiny_run, tiny_run_requests, capsys):
    giant = {**tiny_run_requests[0], "subject": "Ann" * 70_000}
    tiny_run["data"].write_text(json.dumps(giant))
    with pytest.raises(ValueError, match=r"^request 0 \(case_id t0\): field 'prompt \+ target_new' needs"):
        cli_main(tiny_ft_args(tiny_run, tiny_run["root"]))
    assert not list(tiny_run["root"].glob("checkpoints/*.ckpt"))


# -- load_from_checkpoint: the method is a hyperparameter (class_path + init_args) -------------------------------------
def _edited_state(module: EditingModule) -> dict[str, torch.Tensor]:
    state = module.state_dict()
    return {k: v for k, v in state.items() if k.startswith(("model.", "method.", "edits_done"))}


def test_load_from_checkpoint_rebuilds_the_edited_system(tiny_run, tmp_path):
    run = cli_main(tiny_ft_args(tiny_run, tiny_run["root"], "--trainer.max_steps", "2")).model
    path = tiny_run["root"] / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(path, weights_only=True)  # the method is stored as plain data
    method = checkpoint["hyper_parameters"]["method"]
    assert method["class_path"] == "editing.methods.FineTune" and method["init_args"]["layer"] == 1
    assert method["init_args"]["norm_constraint"] is None  # a None choice is kept, not dropped as unset
    # as a Python-made module stores it (no CLI instantiator): the module rebuilds the method from the dict itself
    del checkpoint["hyper_parameters"]["_instantiator"]
    torch.save(checkpoint, tmp_path / "plain.ckpt")
    unedited, _ = load_model(str(tiny_run["model"]))
    ids = run.tokenizer(["The home of Ann is", "The sky is"], return_tensors="pt", padding=True)
    for source in (path, tmp_path / "plain.ckpt"):
        loaded = EditingModule.load_from_checkpoint(source)
        loaded.configure_model()  # idempotent: the model was loaded and the method bound while loading
        assert isinstance(loaded.method, FineTune) and loaded.method.bound and int(loaded.edits_done) == 2
        edited, reference = _edited_state(run), _edited_state(loaded)
        assert edited.keys() == reference.keys() == {"edits_done", "model.model.layers.1.mlp.down_proj.weight"}
        for key in edited:
            torch.testing.assert_close(reference[key], edited[key], msg=key)
        assert not torch.equal(edited["model.model.layers.1.mlp.down_proj.weight"],
                               unedited.model.layers[1].mlp.down_proj.weight)  # fmt: skip
        torch.testing.assert_close(loaded(**ids).logits, run(**ids).logits)
        assert loaded.locality_reference == run.locality_reference


def test_load_from_checkpoint_restores_the_method_state(tiny_run):
    run = cli_main(tiny_fit_args(tiny_run, "lyaplock", tiny_run["root"], "--trainer.max_steps", "2")).model
    loaded = EditingModule.load_from_checkpoint(tiny_run["root"] / "checkpoints" / "last.ckpt")
    assert isinstance(loaded.method, LyapLock) and loaded.method.layers == [1, 2] and loaded.method.mom2_weight == 250
    edited, reference = _edited_state(run), _edited_state(loaded)
    assert {"method.queue_0", "method.svk_1", "method.steps_done"} <= edited.keys() == reference.keys()
    for key in edited:
        torch.testing.assert_close(reference[key], edited[key], msg=key)
    assert int(loaded.method.steps_done) == 2


def test_checkpoints_only_rebuild_imported_methods():
    with pytest.raises(ValueError, match=r"^method: class_path 'os.system' is not an imported EditMethod subclass"):
        EditingModule(method={"class_path": "os.system", "init_args": {}})


def test_wandb_charts_plot_every_metric_against_the_number_of_edits(tmp_path):
    """``edits/total`` is the x axis of every W&B chart (the real offline runs of tests/test_cli.py make the calls)."""
    logger = WandbLogger(offline=True, save_dir=str(tmp_path))
    experiment = mock.MagicMock()
    with mock.patch.object(WandbLogger, "experiment", new_callable=mock.PropertyMock, return_value=experiment):
        module = EditingModule(method=SimpleNamespace())
        module._trainer = SimpleNamespace(
            loggers=[CSVLogger(tmp_path), logger],
            datamodule=None,
            strategy=SingleDeviceStrategy(torch.device("cpu")),
            precision="32-true",
            val_check_interval=1.0,
        )
        module.setup("fit")
    assert experiment.define_metric.call_args_list == [
        mock.call("edits/total"),
        mock.call("*", step_metric="edits/total", step_sync=True),
    ]


def test_a_module_made_in_python_stores_its_method_as_a_config():
    module = EditingModule(method=FineTune(layer=1, norm_constraint=None))
    method = module.hparams["method"]
    assert method["class_path"] == "editing.methods.FineTune"
    assert method["init_args"] == {"layer": 1, "lr": 5e-4, "steps": 25, "norm_constraint": None, "stop_loss": 1e-2,
                                   "box": "per_edit"}  # fmt: skip
    rebuilt = EditingModule(method=method).method
    assert isinstance(rebuilt, FineTune) and (rebuilt.layer, rebuilt.norm_constraint) == (1, None)
