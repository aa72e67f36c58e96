"""``editing.Editor``: the Python API on the tiny model (the same module, data module and trainer as the CLI)."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import pytest
import torch
from helpers import REPO, plain_load, tiny_fit_args

import editing
from editing import EditingModule, Editor
from editing.methods import MEMIT, LyapLock
from editing.metrics import locality_predictions
from editing.requests import RequestError, as_requests
from main import cli_main


def _fast(run: dict[str, Path]) -> dict:
    """The settings of ``helpers.tiny_fit_args`` as method overrides: blocks 1-2, a small corpus, few steps."""
    return dict(
        cache_dir=str(run["cache"]),
        progress_bar=False,
        layers=[1, 2],
        stats_corpus=str(run["corpus"]),
        stats_tokens=300,
        context_seeds=["The"],
        context_length=3,
        target_steps=5,
    )


def _weights_and_state(module: EditingModule) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.state_dict().items() if k.startswith(("model.", "method.", "edits_done"))}


def test_edit_matches_the_command_line_then_evaluates_and_generates(tiny_run, tiny_run_requests, monkeypatch):
    monkeypatch.chdir(tiny_run["model"].parent)
    editor = Editor("lyaplock", model=str(tiny_run["model"]), **_fast(tiny_run))
    assert isinstance(editor.method, LyapLock) and editor.method.mom2_weight == 1000  # not the SmolLM2 preset
    logged = editor.edit(tiny_run_requests[:2])
    assert logged["edits/total"] == 2 and "train/efficacy" in logged
    assert not tiny_run["root"].exists() and not Path("runs").exists()  # no logs, no checkpoints
    tiny_run["data"].write_text("\n".join(json.dumps(r) for r in tiny_run_requests[:2]))
    release = ("--model.method.init_args.mom2_weight", "1000")  # the signature's default, as the Editor's
    cli = cli_main(tiny_fit_args(tiny_run, "lyaplock", tiny_run["root"], *release))
    ours, theirs = _weights_and_state(editor.module), _weights_and_state(cli.model)
    assert ours.keys() == theirs.keys() and "method.svk_0" in ours
    for key in ours:  # one code path: the same edits as `main.py fit` on the same requests
        torch.testing.assert_close(ours[key], theirs[key], msg=key)

    metrics = editor.evaluate()
    summary = json.loads((tiny_run["root"] / "summary.json").read_text())["metrics"]
    assert metrics["val/scored_edits"] == 2 and metrics["edits/total"] == 2
    for name in ("efficacy", "generalization", "locality"):
        assert metrics[f"val/{name}"] == pytest.approx(summary[name])
    batch = editor.tokenizer(["The home of Ann is"], return_tensors="pt")
    out = editor.model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, batch["input_ids"].shape[1] + 3)
    assert out[0, -3] == editor.model(**batch).logits[0, -1].argmax()  # generate() runs the edited model


def test_consecutive_edits_continue_one_stream(tiny_run, tiny_run_requests):
    whole = Editor("lyaplock", model=str(tiny_run["model"]), **_fast(tiny_run))
    whole.edit(tiny_run_requests)  # one call, one edit per step
    split = Editor("lyaplock", model=str(tiny_run["model"]), **_fast(tiny_run))
    split.edit(tiny_run_requests[:2])
    reference = locality_predictions(split.model, split.tokenizer, as_requests(tiny_run_requests[2]))
    split.edit(tiny_run_requests[2])
    assert int(split.module.edits_done) == 3 and int(split.method.steps_done) == 3
    assert [r.case_id for r in split.edited] == ["t0", "t1", "t2"]
    ours, theirs = _weights_and_state(split.module), _weights_and_state(whole.module)
    for key in ours:  # queue, D_base, replay sums and weights as if one run had edited the three
        torch.testing.assert_close(ours[key], theirs[key], msg=key)
    # the third request's locality reference is the model before the second call, not the unedited model's
    assert split.module.locality_reference["t2"] == reference["t2"]
    assert split.module.locality_reference["t0"] == whole.module.locality_reference["t0"]
    assert split.evaluate()["val/scored_edits"] == 3
    with pytest.raises(RequestError, match=r"^requests: record 0 \(case_id t1\): this case_id is already in"):
        split.edit(tiny_run_requests[1])
    with pytest.raises(RequestError, match=r"^requests: record 0 \(case_id x\): missing field 'subject'"):
        split.edit({"case_id": "x", "prompt": "{} is", "target_new": "y"})
    assert int(split.module.edits_done) == 3 and len(split.edited) == 3


def test_a_model_in_memory_is_edited_in_place(tiny_run, tiny_run_requests, tiny_llama, char_tokenizer, tmp_path):
    before = tiny_llama.model.layers[2].mlp.down_proj.weight.clone()
    editor = Editor("memit", model=(tiny_llama, char_tokenizer), **_fast(tiny_run))
    assert editor.model is tiny_llama and isinstance(editor.method, MEMIT)
    assert editor.module.model_name == "in-memory" and "in-memory@" in editor.module._model_id
    baseline = editor.evaluate(tiny_run_requests)  # unedited requests: scored all the same
    assert baseline["val/scored_edits"] == 3 and baseline["val/locality"] == 1.0
    assert editor.module.locality_reference == {}  # an evaluation's reference does not outlive it
    logged = editor.edit(tiny_run_requests[0], evaluate=True)
    assert logged["val/scored_edits"] == 1 and int(editor.module.edits_done) == 1
    assert not torch.equal(tiny_llama.model.layers[2].mlp.down_proj.weight, before)
    texts = ["The home of Ann is", "The sky is"]
    batch = char_tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = tiny_llama(**batch).logits
    assert plain_load(editor.export(tmp_path / "export"), texts, tmp_path).returncode == 0
    torch.testing.assert_close(torch.load(tmp_path / "plain.pt", weights_only=True)["logits"], expected)


def test_readme_example_runs_on_the_tiny_model(tiny_run, tiny_llama, char_tokenizer, monkeypatch, capsys):
    readme = (REPO / "README.md").read_text()
    example = re.search(r"## From Python.*?```python\n(.*?)```", readme, re.S).group(1)
    tiny = functools.partial(Editor, model=(tiny_llama, char_tokenizer), **_fast(tiny_run))
    monkeypatch.setattr(editing, "Editor", tiny)  # `from editing import Editor` in the example gets the tiny one
    exec(compile(example, "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert "'val/scored_edits': 2.0" in printed[0] and "'val/scored_edits': 3.0" in printed[2]
    assert printed[1].startswith("The capital of France is")


def test_methods_by_name_config_or_instance(tiny_run):
    with pytest.raises(ValueError, match=r"^method: unknown method 'rome'; expected one of alphaedit, ft, lyaplock"):
        Editor("rome")
    with pytest.raises(TypeError, match=r"^layers: method overrides apply to a method given by name or config"):
        Editor(MEMIT(), layers=[1])
    with pytest.raises(ValueError, match=r"stop_prob"):  # overrides are checked as the CLI checks them
        Editor("memit", model=str(tiny_run["model"]), stop_prob=2.0)
    method, callbacks = editing.api.resolve_method(REPO / "configs" / "lyaplock_prune.yaml", False, {})
    assert method.mom2_weight == 250  # a config file's values as they are
    assert [type(cb).__name__ for cb in callbacks] == ["PruneRestraint", "ConditionNumberMonitor"]
    method, _ = editing.api.resolve_method("lyaplock", True, {"budget": 5.0})
    assert (method.mom2_weight, method.budget) == (250, 5.0)  # the embedded model's preset, then the overrides
    method, callbacks = editing.api.resolve_method("wise", False, {})
    assert method.prefixes == 10 and [type(cb).__name__ for cb in callbacks] == ["WiseMemory", "RoutingMonitor"]
