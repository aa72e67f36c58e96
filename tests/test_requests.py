"""Tests for editing.requests: the edit-request record type and its dataset readers."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from editing import requests as requests_module
from editing.requests import (
    FORMATS,
    EditRequest,
    LocalityProbe,
    RequestError,
    builtin_requests,
    read_requests,
)

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"

COUNTERFACT_RECORD: dict[str, Any] = {
    "case_id": 3648,
    "pararel_idx": 5151,
    "requested_rewrite": {
        "prompt": "{} is located in",
        "relation_id": "P30",
        "target_new": {"str": "Antarctica", "id": "Q51"},
        "target_true": {"str": "Africa", "id": "Q15"},
        "subject": "Angola",
    },
    "paraphrase_prompts": ["Angola belongs to the continent of", "Angola is a part of the continent of"],
    "neighborhood_prompts": ["Ghana is in", "Ethiopia is in"],
    "attribute_prompts": ["Ross Island is located in"],
    "generation_prompts": ["People around Angola speak the language of"],
}

ZSRE_RECORD: dict[str, Any] = {
    "subject": "UniFirst",
    "src": "What is the product made by UniFirst?",
    "pred": "uniform",
    "rephrase": "What will be the product of UniFirst?",
    "alt": "unmanned aircraft",
    "answers": ["uniform", "uniforms"],
    "loc": "nq question: john goodman's character in the big lebowski",
    "loc_ans": "Walter Sobchak",
    "cond": "uniform >> unmanned aircraft || What is the product made by UniFirst?",
    "portability": {"New Question": "?", "New Answer": "!"},
}

EASYEDIT_RECORD: dict[str, Any] = {
    "case_id": 7,
    "prompt": "The mother tongue of Danielle Darrieux is",
    "target_new": "English",
    "subject": "Danielle Darrieux",
    "ground_truth": "French",
    "rephrase_prompt": "Where Danielle Darrieux is from, people speak the language of",
    "locality_prompt": "Michel Rocard is a native speaker of",
    "locality_ground_truth": "French",
}

CANONICAL_RECORD: dict[str, Any] = {
    "case_id": "cf-1",
    "prompt": "The capital of {} is",
    "subject": "France",
    "target_new": "Rome",
    "target_true": "Paris",
    "rephrase_prompts": ["France's capital city is"],
    "locality": [{"prompt": "The capital of Spain is", "answer": "Madrid"}],
    "generation_prompts": ["France is known for"],
}


def _record(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """Returns a deep copy of ``base`` with top-level keys replaced (a value of ``...`` deletes the key)."""
    record = copy.deepcopy(base)
    for key, value in changes.items():
        if value is ...:
            del record[key]
        else:
            record[key] = value
    return record


def _rewrite(**changes: Any) -> dict[str, Any]:
    """CounterFact's ``requested_rewrite`` with keys replaced as by ``_record``."""
    return _record(COUNTERFACT_RECORD["requested_rewrite"], **changes)


def _bad(base: dict[str, Any], *, good: int = 0, **changes: Any) -> list[dict[str, Any]]:
    """``good`` valid copies of ``base``, then one with ``changes`` applied as by ``_record``."""
    return [base] * good + [_record(base, **changes)]


def _json(records: Any) -> str:
    """``records`` as one JSON document (indented, like the real files)."""
    return json.dumps(records, indent=1)


def _lines(records: list[Any]) -> str:
    """``records`` as JSON Lines."""
    return "".join(json.dumps(r) + "\n" for r in records)


def _write_json(tmp_path: Path, records: Any, name: str = "data.json") -> Path:
    path = tmp_path / name
    path.write_text(_json(records), encoding="utf-8")
    return path


def _write_jsonl(tmp_path: Path, records: list[Any], name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_text(_lines(records), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------- record types

_FIELDS: dict[str, Any] = {"case_id": "1", "prompt": "{} is", "subject": "a", "target_new": "b"}


def test_edit_request_text_fills_subject_without_format() -> None:
    request = EditRequest(case_id="1", prompt="In {} the set {a, b} is", subject="Paris", target_new="x")
    assert request.text == "In Paris the set {a, b} is"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        pytest.param(
            {"prompt": "{} and {}"},
            r"field 'prompt' must contain '\{\}' exactly once, found 2",
            id="several-placeholders",
        ),
        pytest.param({"prompt": "no placeholder"}, r"field 'prompt' .* found 0", id="missing-placeholder"),
        *(
            pytest.param({field: "   "}, f"field '{field}' is empty", id=f"blank-{field}")
            for field in ("case_id", "prompt", "subject", "target_new", "target_true")
        ),
        pytest.param({"target_new": 3}, "field 'target_new' must be a string, got number", id="target-new-number"),
        pytest.param(
            {"rephrase_prompts": ("ok", "")}, r"field 'rephrase_prompts\[1\]' is empty", id="rephrase-item-blank"
        ),
        pytest.param(
            {"generation_prompts": "g"},
            "field 'generation_prompts' must be a sequence of strings, got string",
            id="generation-prompts-string",
        ),
        pytest.param(
            {"locality": ({"prompt": "p"},)},
            r"field 'locality\[0\]' must be a LocalityProbe, got object",
            id="locality-item-dict",
        ),
    ],
)
def test_edit_request_rejects(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(RequestError, match=message):
        EditRequest(**{**_FIELDS, **changes})


def test_edit_request_normalizes_lists_to_tuples_and_is_hashable() -> None:
    request = EditRequest(
        case_id="1",
        prompt="{} is",
        subject="a",
        target_new="b",
        rephrase_prompts=["r"],  # type: ignore[arg-type]
        locality=[LocalityProbe("p", "q")],  # type: ignore[arg-type]
        generation_prompts=["g"],  # type: ignore[arg-type]
    )
    assert request.rephrase_prompts == ("r",)
    assert request.locality == (LocalityProbe("p", "q"),)
    assert request.generation_prompts == ("g",)
    assert hash(request) == hash(copy.deepcopy(request))


def test_edit_request_is_frozen() -> None:
    request = EditRequest(case_id="1", prompt="{} is", subject="a", target_new="b")
    with pytest.raises(AttributeError):
        request.subject = "c"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        pytest.param({"prompt": "prompt", "answer": " "}, "field 'answer' is empty", id="blank-answer"),
        pytest.param({"prompt": None, "answer": "a"}, "field 'prompt' must be a string, got null", id="null-prompt"),
        pytest.param(
            {"prompt": "p", "answer": "a", "gold_prompt": " "}, "field 'gold_prompt' is empty", id="blank-gold-prompt"
        ),
        pytest.param(
            {"prompt": "p", "answer": "a", "gold_prompt": 3},
            "field 'gold_prompt' must be a string, got number",
            id="gold-prompt-number",
        ),
    ],
)
def test_locality_probe_rejects(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(RequestError, match=message):
        LocalityProbe(**fields)


def test_locality_probe_gold_prompt_defaults_to_none() -> None:
    assert LocalityProbe("p", "a").gold_prompt is None
    assert LocalityProbe("p", "a", gold_prompt="p?").gold_prompt == "p?"


# --------------------------------------------------------------------------------------------- readers


def test_read_counterfact(tmp_path: Path) -> None:
    path = _write_json(tmp_path, [COUNTERFACT_RECORD], "counterfact.json")
    (request,) = read_requests(path, format="counterfact")
    assert request == EditRequest(
        case_id="3648",
        prompt="{} is located in",
        subject="Angola",
        target_new="Antarctica",
        target_true="Africa",
        rephrase_prompts=("Angola belongs to the continent of", "Angola is a part of the continent of"),
        locality=(LocalityProbe("Ghana is in", "Africa"), LocalityProbe("Ethiopia is in", "Africa")),
        generation_prompts=("People around Angola speak the language of",),
    )
    assert request.text == "Angola is located in"


def test_read_counterfact_optional_lists_may_be_absent(tmp_path: Path) -> None:
    record = _record(COUNTERFACT_RECORD, paraphrase_prompts=..., neighborhood_prompts=..., generation_prompts=...)
    (request,) = read_requests(_write_json(tmp_path, [record]), format="counterfact")
    assert request.rephrase_prompts == ()
    assert request.locality == ()
    assert request.generation_prompts == ()


def test_read_zsre(tmp_path: Path) -> None:
    other = _record(ZSRE_RECORD, subject="Paris", src="Which country is Paris in?", alt="Peru", answers=["France"])
    path = _write_json(tmp_path, [ZSRE_RECORD, other], "zsre.json")
    first, second = read_requests(path, format="zsre")
    assert first == EditRequest(
        case_id="0",
        prompt="What is the product made by {}?",
        subject="UniFirst",
        target_new="unmanned aircraft",
        target_true="uniform",
        rephrase_prompts=("What will be the product of UniFirst?",),
        locality=(LocalityProbe(ZSRE_RECORD["loc"], "Walter Sobchak", gold_prompt=ZSRE_RECORD["loc"] + "?"),),
    )
    assert first.text == ZSRE_RECORD["src"]
    assert second.case_id == "1"
    assert second.prompt == "Which country is {} in?"


def test_read_zsre_replaces_only_first_subject_occurrence(tmp_path: Path) -> None:
    record = _record(ZSRE_RECORD, subject="A", src="Is A related to A?")
    (request,) = read_requests(_write_json(tmp_path, [record]), format="zsre")
    assert request.prompt == "Is {} related to A?"


def test_read_zsre_without_optional_fields(tmp_path: Path) -> None:
    record = _record(ZSRE_RECORD, answers=..., rephrase=..., loc=..., loc_ans=...)
    (request,) = read_requests(_write_json(tmp_path, [record]), format="zsre")
    assert request.target_true is None
    assert request.rephrase_prompts == ()
    assert request.locality == ()


def test_read_easyedit(tmp_path: Path) -> None:
    path = _write_json(tmp_path, [EASYEDIT_RECORD], "counterfact_easyedit.json")
    (request,) = read_requests(path, format="easyedit")
    assert request == EditRequest(
        case_id="7",
        prompt="The mother tongue of {} is",
        subject="Danielle Darrieux",
        target_new="English",
        target_true="French",
        rephrase_prompts=("Where Danielle Darrieux is from, people speak the language of",),
        locality=(LocalityProbe("Michel Rocard is a native speaker of", "French"),),
    )


def test_read_easyedit_lists_and_default_case_id(tmp_path: Path) -> None:
    record = _record(
        EASYEDIT_RECORD,
        case_id=...,
        rephrase_prompt=["r1", "r2"],
        locality_prompt=["p1", "p2"],
        locality_ground_truth=["a1", "a2"],
    )
    _, request = read_requests(_write_json(tmp_path, [EASYEDIT_RECORD, record]), format="easyedit")
    assert request.case_id == "1"
    assert request.rephrase_prompts == ("r1", "r2")
    assert request.locality == (LocalityProbe("p1", "a1"), LocalityProbe("p2", "a2"))


def test_read_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    second = _record(CANONICAL_RECORD, case_id=2, target_true=..., rephrase_prompts=..., locality=...)
    path.write_text(f"{json.dumps(CANONICAL_RECORD)}\n\n   \n{json.dumps(second)}\n", encoding="utf-8")
    first, other = read_requests(path, format="jsonl")
    assert first == EditRequest(
        case_id="cf-1",
        prompt="The capital of {} is",
        subject="France",
        target_new="Rome",
        target_true="Paris",
        rephrase_prompts=("France's capital city is",),
        locality=(LocalityProbe("The capital of Spain is", "Madrid"),),
        generation_prompts=("France is known for",),
    )
    assert other.case_id == "2"
    assert other.target_true is None
    assert other.rephrase_prompts == ()
    assert other.locality == ()


def test_read_jsonl_locality_gold_prompt(tmp_path: Path) -> None:
    locality = [
        {"prompt": "The capital of Spain is", "answer": "Madrid", "gold_prompt": "The capital of Spain is?"},
        {"prompt": "The capital of Italy is", "answer": "Rome", "gold_prompt": None},
    ]
    (request,) = read_requests(_write_jsonl(tmp_path, [_record(CANONICAL_RECORD, locality=locality)]))
    assert request.locality == (
        LocalityProbe("The capital of Spain is", "Madrid", gold_prompt="The capital of Spain is?"),
        LocalityProbe("The capital of Italy is", "Rome"),
    )


def test_read_jsonl_accepts_filled_prompt(tmp_path: Path) -> None:
    record = _record(CANONICAL_RECORD, prompt="The capital of France is")
    (request,) = read_requests(_write_jsonl(tmp_path, [record]))
    assert request.prompt == "The capital of {} is"


def test_read_jsonl_keeps_other_braces(tmp_path: Path) -> None:
    record = _record(CANONICAL_RECORD, prompt="In {x}: {} is", subject="y")
    (request,) = read_requests(_write_jsonl(tmp_path, [record]))
    assert request.text == "In {x}: y is"


def test_read_accepts_str_path_and_bom(tmp_path: Path) -> None:
    path = tmp_path / "bom.json"
    path.write_text("\ufeff" + json.dumps([EASYEDIT_RECORD]), encoding="utf-8")
    assert len(read_requests(str(path))) == 1


def test_empty_list_gives_no_requests(tmp_path: Path) -> None:
    assert read_requests(_write_json(tmp_path, [])) == []


# --------------------------------------------------------------------------------------------- auto and limit


@pytest.mark.parametrize(
    ("record", "expected_prompt"),
    [
        (COUNTERFACT_RECORD, "{} is located in"),
        (ZSRE_RECORD, "What is the product made by {}?"),
        (EASYEDIT_RECORD, "The mother tongue of {} is"),
        (CANONICAL_RECORD, "The capital of {} is"),
    ],
)
def test_auto_detects_json_list_layouts(tmp_path: Path, record: dict[str, Any], expected_prompt: str) -> None:
    (request,) = read_requests(_write_json(tmp_path, [record]))
    assert request.prompt == expected_prompt


def test_auto_uses_jsonl_suffix(tmp_path: Path) -> None:
    (request,) = read_requests(_write_jsonl(tmp_path, [CANONICAL_RECORD], "x.JSONL"))
    assert request.case_id == "cf-1"


def test_explicit_jsonl_accepts_json_list(tmp_path: Path) -> None:
    (request,) = read_requests(_write_json(tmp_path, [CANONICAL_RECORD]), format="jsonl")
    assert request.case_id == "cf-1"


def test_limit_returns_first_records_and_validates_only_those(tmp_path: Path) -> None:
    bad = _record(ZSRE_RECORD, alt="")
    path = _write_json(tmp_path, [ZSRE_RECORD, ZSRE_RECORD, bad])
    assert [r.case_id for r in read_requests(path, limit=2)] == ["0", "1"]
    with pytest.raises(RequestError, match=r"record 2 .*field 'alt' is empty"):
        read_requests(path, limit=3)


def test_limit_larger_than_file_returns_everything(tmp_path: Path) -> None:
    path = _write_json(tmp_path, [ZSRE_RECORD, ZSRE_RECORD])
    assert len(read_requests(path, limit=10)) == 2


def test_limit_stops_reading_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(f"{json.dumps(CANONICAL_RECORD)}\n{{not json\n", encoding="utf-8")
    assert len(read_requests(path, limit=1)) == 1
    with pytest.raises(RequestError, match=r"record 1 \(line 2\): invalid JSON"):
        read_requests(path)


# --------------------------------------------------------------------------------------------- read errors

_DIRECTORY = object()  # content marker: create a directory instead of a file


def _case(case: str, name: str, content: Any, message: str, **kwargs: Any) -> Any:
    """A ``test_read_rejects_file`` row: file name, content (None: no file), read kwargs, expected message."""
    return pytest.param(name, content, kwargs, message, id=case)


_FILE_ERRORS = [
    _case("missing-file", "nope.json", None, r"nope\.json: file does not exist"),
    _case("directory", "folder", _DIRECTORY, "not a regular file"),
    _case("not-utf8", "latin1.json", b'["caf\xe9"]', r"latin1\.json: not valid UTF-8"),
    _case(
        "unknown-format",
        "data.json",
        _json([ZSRE_RECORD]),
        "unknown format 'rome'; expected 'auto' or one of " + ", ".join(FORMATS),
        format="rome",
    ),
    *(
        _case(
            f"limit-{limit}",
            "zsre.json",
            _json([ZSRE_RECORD]),
            r"zsre\.json: limit must be an integer >= 1",
            limit=limit,
        )
        for limit in (0, -3, 1.5, True)
    ),
    _case(
        "invalid-json",
        "broken.json",
        '[\n {"src": "a",\n  "alt": }\n]\n',
        r"broken\.json: invalid JSON at line 3, column 10: Expecting value",
        format="zsre",
    ),
    *(
        _case(
            f"top-level-object-{fmt}",
            "obj.json",
            _json({"data": [ZSRE_RECORD]}),
            r"obj\.json: top level must be a JSON list of records, got object",
            format=fmt,
        )
        for fmt in ("counterfact", "zsre", "easyedit", "auto")
    ),
    _case(
        "auto-unknown-layout",
        "odd.json",
        _json([{"question": "q", "answer": "a"}]),
        r"odd\.json: record 0: cannot detect the format .*'answer', 'question'",
    ),
    _case(
        "auto-first-record-not-object",
        "data.json",
        _json(["text"]),
        "record 0: record is not a JSON object, got string",
    ),
    _case(
        "auto-json-lines-with-json-suffix",
        "lines.json",
        _lines([CANONICAL_RECORD, CANONICAL_RECORD]),
        r"lines\.json: invalid JSON at line 2, column 1: Extra data .*\.jsonl",
    ),
    _case(
        "record-not-object",
        "zsre.json",
        _json([ZSRE_RECORD, ["not", "a", "dict"]]),
        r"zsre\.json: record 1: record is not a JSON object, got array",
    ),
    _case(
        "jsonl-record-not-object",
        "data.jsonl",
        f"\n{json.dumps(CANONICAL_RECORD)}\n[1, 2]\n",
        r"data\.jsonl: record 1 \(line 3\): record is not a JSON object, got array",
    ),
    _case(
        "jsonl-invalid-json",
        "data.jsonl",
        f'{json.dumps(CANONICAL_RECORD)}\n\n{{"case_id": 1,}}\n',
        r"data\.jsonl: record 1 \(line 3\): invalid JSON at column \d+",
    ),
]

# Rows per layout: (case, records, expected message); the file is read with format="auto".
_RECORD_ERRORS: dict[str, list[tuple[str, list[Any], str]]] = {
    "counterfact": [
        (
            "empty-target",
            _bad(COUNTERFACT_RECORD, good=1, requested_rewrite=_rewrite(target_new={"str": "  ", "id": "Q1"})),
            r"counterfact\.json: record 1 \(case_id 3648\): field 'requested_rewrite\.target_new\.str' is empty",
        ),
        (
            "missing-nested-field",
            _bad(COUNTERFACT_RECORD, requested_rewrite=_rewrite(target_true=...)),
            r"record 0 \(case_id 3648\): missing field 'requested_rewrite\.target_true'",
        ),
        (
            "nested-value-not-object",
            _bad(COUNTERFACT_RECORD, good=1, requested_rewrite=_rewrite(target_new="Antarctica")),
            r"record 1 .*field 'requested_rewrite\.target_new' must be an object, got string",
        ),
        (
            "prompt-without-placeholder",
            _bad(COUNTERFACT_RECORD, good=1, requested_rewrite=_rewrite(prompt="Angola is located in")),
            r"record 1 .*field 'requested_rewrite\.prompt' must contain '\{\}' exactly once",
        ),
        (
            "missing-case-id",
            _bad(COUNTERFACT_RECORD, case_id=...),
            r"counterfact\.json: record 0: missing field 'case_id'",
        ),
        *(
            (
                f"case-id-{kind}",
                _bad(COUNTERFACT_RECORD, case_id=value),
                "record 0: field 'case_id' must be a string or an integer",
            )
            for kind, value in (("boolean", True), ("float", 1.5), ("null", None), ("list", ["x"]))
        ),
        (
            "paraphrases-not-list",
            _bad(COUNTERFACT_RECORD, paraphrase_prompts="one prompt"),
            r"record 0 .*field 'paraphrase_prompts' must be a list of strings, got string",
        ),
        (
            "neighborhood-item-number",
            _bad(COUNTERFACT_RECORD, neighborhood_prompts=["Ghana is in", 3]),
            r"field 'neighborhood_prompts\[1\]' must be a string, got number",
        ),
    ],
    "zsre": [
        (
            "empty-target",
            _bad(ZSRE_RECORD, good=2, alt=""),
            r"zsre\.json: record 2 \(case_id 2\): field 'alt' is empty",
        ),
        (
            "subject-not-in-prompt",
            _bad(ZSRE_RECORD, subject="Acme"),
            r"record 0 \(case_id 0\): subject 'Acme' does not occur in field 'src'",
        ),
        ("missing-field", _bad(ZSRE_RECORD, good=1, subject=...), r"record 1 \(case_id 1\): missing field 'subject'"),
        ("target-number", _bad(ZSRE_RECORD, alt=2006), r"record 0 .*field 'alt' must be a string, got number"),
        (
            "answers-not-list",
            _bad(ZSRE_RECORD, answers="uniform"),
            r"record 0 .*field 'answers' must be a list of strings, got string",
        ),
        (
            "loc-without-answer",
            _bad(ZSRE_RECORD, loc_ans=...),
            r"record 0 .*missing field 'loc_ans' \(required when 'loc' is given\)",
        ),
        (
            "literal-placeholder",
            _bad(ZSRE_RECORD, src="What is {} made by UniFirst?"),
            r"record 0 .*field 'src' contains '\{\}'",
        ),
    ],
    "easyedit": [
        (
            "subject-not-in-prompt",
            _bad(EASYEDIT_RECORD, subject="Nobody"),
            r"record 0 \(case_id 7\): subject 'Nobody' does not occur in field 'prompt'",
        ),
        (
            "locality-length-mismatch",
            _bad(EASYEDIT_RECORD, locality_prompt=["a", "b"], locality_ground_truth=["x"]),
            r"record 0 .*'locality_prompt' and 'locality_ground_truth' .*\(2 and 1\)",
        ),
        (
            "rephrase-object",
            _bad(EASYEDIT_RECORD, rephrase_prompt={"text": "x"}),
            "field 'rephrase_prompt' must be a string or a list of strings, got object",
        ),
        ("empty-target", _bad(EASYEDIT_RECORD, target_new=""), r"record 0 \(case_id 7\): field 'target_new' is empty"),
    ],
    "jsonl": [
        (
            "missing-field",
            _bad(CANONICAL_RECORD, good=1, target_new=...),
            r"data\.jsonl: record 1 \(line 2, case_id cf-1\): missing field 'target_new'",
        ),
        (
            "subject-not-in-prompt",
            _bad(CANONICAL_RECORD, prompt="The capital of Italy is"),
            r"record 0 \(line 1, case_id cf-1\): subject 'France' does not occur in field 'prompt'",
        ),
        (
            "rephrase-item-null",
            _bad(CANONICAL_RECORD, rephrase_prompts=["ok", None]),
            r"record 0 .*field 'rephrase_prompts\[1\]' must be a string, got null",
        ),
        ("empty-target-true", _bad(CANONICAL_RECORD, target_true=" "), r"record 0 .*field 'target_true' is empty"),
        (
            "several-placeholders",
            _bad(CANONICAL_RECORD, prompt="{} and {}"),
            r"record 0 .*field 'prompt' must contain '\{\}' exactly once, found 2",
        ),
        *(
            (
                f"locality-{kind}",
                _bad(CANONICAL_RECORD, locality=locality),
                r"record 0 \(line 1, case_id cf-1\): " + message,
            )
            for kind, locality, message in (
                ("string", "x", r"field 'locality' must be a list of objects, got string"),
                ("item-string", ["x"], r"field 'locality\[0\]' must be an object, got string"),
                ("missing-answer", [{"prompt": "p"}], r"missing field 'locality\[0\]\.answer'"),
                (
                    "answer-number",
                    [{"prompt": "p", "answer": 1}],
                    r"field 'locality\[0\]\.answer' must be a string, got number",
                ),
                (
                    "blank-gold-prompt",
                    [{"prompt": "p", "answer": "a", "gold_prompt": " "}],
                    r"field 'locality\[0\]\.gold_prompt' is empty",
                ),
            )
        ),
    ],
}
_FILE_NAMES = {
    "counterfact": "counterfact.json",
    "zsre": "zsre.json",
    "easyedit": "easyedit.json",
    "jsonl": "data.jsonl",
}


@pytest.mark.parametrize(("name", "content", "kwargs", "message"), _FILE_ERRORS)
def test_read_rejects_file(tmp_path: Path, name: str, content: Any, kwargs: dict[str, Any], message: str) -> None:
    path = tmp_path / name
    if content is _DIRECTORY:
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(RequestError, match=message):
        read_requests(path, **kwargs)


@pytest.mark.parametrize(
    ("layout", "records", "message"),
    [
        pytest.param(layout, records, message, id=f"{layout}-{case}")
        for layout, rows in _RECORD_ERRORS.items()
        for case, records, message in rows
    ],
)
def test_read_rejects_record(tmp_path: Path, layout: str, records: list[Any], message: str) -> None:
    path = tmp_path / _FILE_NAMES[layout]
    path.write_text(_lines(records) if layout == "jsonl" else _json(records), encoding="utf-8")
    with pytest.raises(RequestError, match=message):
        read_requests(path)


def test_internal_key_error_is_converted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_reader(record: dict[str, Any], where: Any) -> EditRequest:
        return record["missing"]

    monkeypatch.setitem(requests_module._READERS, "zsre", broken_reader)
    path = _write_json(tmp_path, [ZSRE_RECORD], "zsre.json")
    with pytest.raises(RequestError, match=r"zsre\.json: record 0: malformed record \(KeyError"):
        read_requests(path, format="zsre")


# --------------------------------------------------------------------------------------------- real data


def _real_file(name: str) -> Path:
    """Returns a file from ../shared/data, skipping the test when it is absent."""
    path = DATA_DIR / name
    if not path.is_file():
        pytest.skip(f"{path} not available")
    return path


def test_real_counterfact() -> None:
    requests = read_requests(_real_file("counterfact.json"))
    assert len(requests) == 400
    assert all(len(r.rephrase_prompts) == 2 and len(r.locality) == 10 for r in requests)
    assert all(probe.answer == r.target_true for r in requests for probe in r.locality)
    assert len({r.case_id for r in requests}) == 400


def test_real_zsre_eval() -> None:
    requests = read_requests(_real_file("zsre_eval.json"))
    assert len(requests) == 837
    assert all(r.subject in r.text and len(r.rephrase_prompts) == 1 and len(r.locality) == 1 for r in requests)


def test_real_zsre_train_reports_empty_target() -> None:
    path = _real_file("zsre_train_1k.json")
    assert len(read_requests(path, limit=500)) == 500
    with pytest.raises(RequestError, match=r"zsre_train_1k\.json: record 534 \(case_id 534\): field 'alt' is empty"):
        read_requests(path)


def test_real_counterfact_easyedit() -> None:
    requests = read_requests(_real_file("counterfact_easyedit.json"))
    assert len(requests) == 1500
    assert requests[0].text == "The mother tongue of Danielle Darrieux is"


def test_builtin_requests() -> None:
    if not requests_module._BUILTIN_FILE.is_file():
        pytest.skip("editing/builtin/counterfact_builtin.jsonl not written yet")
    requests = builtin_requests()
    assert requests
    assert builtin_requests(limit=1) == requests[:1]


def test_builtin_requests_reads_canonical_jsonl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write_jsonl(tmp_path, [CANONICAL_RECORD, _record(CANONICAL_RECORD, case_id="cf-2")])
    monkeypatch.setattr(requests_module, "_BUILTIN_FILE", path)
    assert [r.case_id for r in builtin_requests()] == ["cf-1", "cf-2"]
    assert [r.case_id for r in builtin_requests(limit=1)] == ["cf-1"]
