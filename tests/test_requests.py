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


def _write_json(tmp_path: Path, records: Any, name: str = "data.json") -> Path:
    """Writes ``records`` as one JSON document (indented, like the real files)."""
    path = tmp_path / name
    path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    return path


def _write_jsonl(tmp_path: Path, records: list[Any], name: str = "data.jsonl") -> Path:
    """Writes ``records`` one JSON document per line."""
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------- record types


def test_edit_request_text_fills_subject_without_format() -> None:
    request = EditRequest(case_id="1", prompt="In {} the set {a, b} is", subject="Paris", target_new="x")
    assert request.text == "In Paris the set {a, b} is"


def test_edit_request_rejects_several_placeholders() -> None:
    with pytest.raises(RequestError, match=r"field 'prompt' must contain '\{\}' exactly once, found 2"):
        EditRequest(case_id="1", prompt="{} and {}", subject="a", target_new="b")


def test_edit_request_rejects_missing_placeholder() -> None:
    with pytest.raises(RequestError, match=r"field 'prompt' .* found 0"):
        EditRequest(case_id="1", prompt="no placeholder", subject="a", target_new="b")


@pytest.mark.parametrize("field", ["case_id", "prompt", "subject", "target_new", "target_true"])
def test_edit_request_rejects_blank_fields(field: str) -> None:
    fields = {"case_id": "1", "prompt": "{} is", "subject": "a", "target_new": "b", "target_true": "c"}
    fields[field] = "   "
    with pytest.raises(RequestError, match=f"field '{field}' is empty"):
        EditRequest(**fields)


def test_edit_request_rejects_non_string_field() -> None:
    with pytest.raises(RequestError, match="field 'target_new' must be a string, got number"):
        EditRequest(case_id="1", prompt="{} is", subject="a", target_new=3)  # type: ignore[arg-type]


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


def test_edit_request_rejects_bad_sequences() -> None:
    with pytest.raises(RequestError, match=r"field 'rephrase_prompts\[1\]' is empty"):
        EditRequest(case_id="1", prompt="{} is", subject="a", target_new="b", rephrase_prompts=("ok", ""))
    with pytest.raises(RequestError, match="field 'generation_prompts' must be a sequence of strings, got string"):
        EditRequest(case_id="1", prompt="{} is", subject="a", target_new="b", generation_prompts="g")  # type: ignore[arg-type]
    with pytest.raises(RequestError, match=r"field 'locality\[0\]' must be a LocalityProbe, got object"):
        EditRequest(case_id="1", prompt="{} is", subject="a", target_new="b", locality=({"prompt": "p"},))  # type: ignore[arg-type]


def test_edit_request_is_frozen() -> None:
    request = EditRequest(case_id="1", prompt="{} is", subject="a", target_new="b")
    with pytest.raises(AttributeError):
        request.subject = "c"  # type: ignore[misc]


def test_locality_probe_validates() -> None:
    with pytest.raises(RequestError, match="field 'answer' is empty"):
        LocalityProbe("prompt", " ")
    with pytest.raises(RequestError, match="field 'prompt' must be a string, got null"):
        LocalityProbe(None, "a")  # type: ignore[arg-type]


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
        locality=(LocalityProbe("nq question: john goodman's character in the big lebowski", "Walter Sobchak"),),
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


def test_auto_rejects_unknown_layout(tmp_path: Path) -> None:
    path = _write_json(tmp_path, [{"question": "q", "answer": "a"}], "odd.json")
    with pytest.raises(RequestError, match=r"odd\.json: record 0: cannot detect the format .*'answer', 'question'"):
        read_requests(path)


def test_auto_rejects_non_object_first_record(tmp_path: Path) -> None:
    with pytest.raises(RequestError, match="record 0: record is not a JSON object, got string"):
        read_requests(_write_json(tmp_path, ["text"]))


def test_auto_hints_at_jsonl_for_json_lines_with_json_suffix(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path, [CANONICAL_RECORD, CANONICAL_RECORD], "lines.json")
    with pytest.raises(RequestError, match=r"lines\.json: invalid JSON at line 2, column 1: Extra data .*\.jsonl"):
        read_requests(path)


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


@pytest.mark.parametrize("limit", [0, -3, 1.5, True])
def test_invalid_limit(tmp_path: Path, limit: Any) -> None:
    path = _write_json(tmp_path, [ZSRE_RECORD], "zsre.json")
    with pytest.raises(RequestError, match=r"zsre\.json: limit must be an integer >= 1"):
        read_requests(path, limit=limit)


# --------------------------------------------------------------------------------------------- file errors


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RequestError, match=r"nope\.json: file does not exist"):
        read_requests(tmp_path / "nope.json")


def test_directory_is_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(RequestError, match="not a regular file"):
        read_requests(tmp_path)


def test_unknown_format(tmp_path: Path) -> None:
    path = _write_json(tmp_path, [ZSRE_RECORD])
    with pytest.raises(RequestError, match="unknown format 'rome'; expected 'auto' or one of " + ", ".join(FORMATS)):
        read_requests(path, format="rome")


def test_invalid_json_names_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('[\n {"src": "a",\n  "alt": }\n]\n', encoding="utf-8")
    with pytest.raises(RequestError, match=r"broken\.json: invalid JSON at line 3, column 10: Expecting value"):
        read_requests(path, format="zsre")


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.json"
    path.write_bytes(b'["caf\xe9"]')
    with pytest.raises(RequestError, match=r"latin1\.json: not valid UTF-8"):
        read_requests(path)


@pytest.mark.parametrize("fmt", ["counterfact", "zsre", "easyedit", "auto"])
def test_top_level_must_be_list(tmp_path: Path, fmt: str) -> None:
    path = _write_json(tmp_path, {"data": [ZSRE_RECORD]}, "obj.json")
    with pytest.raises(RequestError, match=r"obj\.json: top level must be a JSON list of records, got object"):
        read_requests(path, format=fmt)


def test_record_not_an_object(tmp_path: Path) -> None:
    path = _write_json(tmp_path, [ZSRE_RECORD, ["not", "a", "dict"]], "zsre.json")
    with pytest.raises(RequestError, match=r"zsre\.json: record 1: record is not a JSON object, got array"):
        read_requests(path)


def test_jsonl_record_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(f"\n{json.dumps(CANONICAL_RECORD)}\n[1, 2]\n", encoding="utf-8")
    with pytest.raises(RequestError, match=r"data\.jsonl: record 1 \(line 3\): record is not a JSON object, got array"):
        read_requests(path)


def test_jsonl_invalid_json_names_record_and_line(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(f'{json.dumps(CANONICAL_RECORD)}\n\n{{"case_id": 1,}}\n', encoding="utf-8")
    with pytest.raises(RequestError, match=r"data\.jsonl: record 1 \(line 3\): invalid JSON at column \d+"):
        read_requests(path)


# --------------------------------------------------------------------------------------------- record errors


def _counterfact_with(tmp_path: Path, rewrite_changes: dict[str, Any], index: int = 1) -> Path:
    """Writes a counterfact file whose record ``index`` has ``requested_rewrite`` keys changed."""
    bad = copy.deepcopy(COUNTERFACT_RECORD)
    for key, value in rewrite_changes.items():
        if value is ...:
            del bad["requested_rewrite"][key]
        else:
            bad["requested_rewrite"][key] = value
    records = [COUNTERFACT_RECORD] * index + [bad]
    return _write_json(tmp_path, records, "counterfact.json")


def test_counterfact_empty_target(tmp_path: Path) -> None:
    path = _counterfact_with(tmp_path, {"target_new": {"str": "  ", "id": "Q1"}})
    expected = r"counterfact\.json: record 1 \(case_id 3648\): field 'requested_rewrite\.target_new\.str' is empty"
    with pytest.raises(RequestError, match=expected):
        read_requests(path)


def test_counterfact_missing_nested_field(tmp_path: Path) -> None:
    path = _counterfact_with(tmp_path, {"target_true": ...}, index=0)
    with pytest.raises(
        RequestError, match=r"record 0 \(case_id 3648\): missing field 'requested_rewrite\.target_true'"
    ):
        read_requests(path)


def test_counterfact_nested_value_not_object(tmp_path: Path) -> None:
    path = _counterfact_with(tmp_path, {"target_new": "Antarctica"})
    with pytest.raises(
        RequestError, match=r"record 1 .*field 'requested_rewrite\.target_new' must be an object, got string"
    ):
        read_requests(path)


def test_counterfact_prompt_without_placeholder(tmp_path: Path) -> None:
    path = _counterfact_with(tmp_path, {"prompt": "Angola is located in"})
    with pytest.raises(
        RequestError, match=r"record 1 .*field 'requested_rewrite\.prompt' must contain '\{\}' exactly once"
    ):
        read_requests(path)


def test_counterfact_missing_case_id(tmp_path: Path) -> None:
    path = _write_json(tmp_path, [_record(COUNTERFACT_RECORD, case_id=...)], "counterfact.json")
    with pytest.raises(RequestError, match=r"counterfact\.json: record 0: missing field 'case_id'"):
        read_requests(path)


@pytest.mark.parametrize("case_id", [True, 1.5, None, ["x"]])
def test_case_id_wrong_type(tmp_path: Path, case_id: Any) -> None:
    path = _write_json(tmp_path, [_record(COUNTERFACT_RECORD, case_id=case_id)], "counterfact.json")
    with pytest.raises(RequestError, match="record 0: field 'case_id' must be a string or an integer"):
        read_requests(path)


def test_counterfact_paraphrases_not_list(tmp_path: Path) -> None:
    path = _write_json(tmp_path, [_record(COUNTERFACT_RECORD, paraphrase_prompts="one prompt")], "counterfact.json")
    with pytest.raises(
        RequestError, match=r"record 0 .*field 'paraphrase_prompts' must be a list of strings, got string"
    ):
        read_requests(path)


def test_counterfact_neighborhood_item_wrong_type(tmp_path: Path) -> None:
    record = _record(COUNTERFACT_RECORD, neighborhood_prompts=["Ghana is in", 3])
    path = _write_json(tmp_path, [record], "counterfact.json")
    with pytest.raises(RequestError, match=r"field 'neighborhood_prompts\[1\]' must be a string, got number"):
        read_requests(path)


def test_zsre_empty_target(tmp_path: Path) -> None:
    path = _write_json(tmp_path, [ZSRE_RECORD, ZSRE_RECORD, _record(ZSRE_RECORD, alt="")], "zsre.json")
    with pytest.raises(RequestError, match=r"zsre\.json: record 2 \(case_id 2\): field 'alt' is empty"):
        read_requests(path)


def test_zsre_subject_not_in_prompt(tmp_path: Path) -> None:
    path = _write_json(tmp_path, [_record(ZSRE_RECORD, subject="Acme")], "zsre.json")
    with pytest.raises(RequestError, match=r"record 0 \(case_id 0\): subject 'Acme' does not occur in field 'src'"):
        read_requests(path)


def test_zsre_missing_field(tmp_path: Path) -> None:
    path = _write_json(tmp_path, [ZSRE_RECORD, _record(ZSRE_RECORD, subject=...)], "zsre.json")
    with pytest.raises(RequestError, match=r"record 1 \(case_id 1\): missing field 'subject'"):
        read_requests(path, format="zsre")


def test_zsre_wrong_target_type(tmp_path: Path) -> None:
    path = _write_json(tmp_path, [_record(ZSRE_RECORD, alt=2006)])
    with pytest.raises(RequestError, match=r"record 0 .*field 'alt' must be a string, got number"):
        read_requests(path)


def test_zsre_answers_not_list(tmp_path: Path) -> None:
    path = _write_json(tmp_path, [_record(ZSRE_RECORD, answers="uniform")])
    with pytest.raises(RequestError, match=r"record 0 .*field 'answers' must be a list of strings, got string"):
        read_requests(path)


def test_zsre_loc_without_answer(tmp_path: Path) -> None:
    path = _write_json(tmp_path, [_record(ZSRE_RECORD, loc_ans=...)])
    with pytest.raises(RequestError, match=r"record 0 .*missing field 'loc_ans' \(required when 'loc' is given\)"):
        read_requests(path)


def test_zsre_prompt_with_literal_placeholder(tmp_path: Path) -> None:
    path = _write_json(tmp_path, [_record(ZSRE_RECORD, src="What is {} made by UniFirst?")])
    with pytest.raises(RequestError, match=r"record 0 .*field 'src' contains '\{\}'"):
        read_requests(path)


def test_easyedit_subject_not_in_prompt(tmp_path: Path) -> None:
    path = _write_json(tmp_path, [_record(EASYEDIT_RECORD, subject="Nobody")], "ee.json")
    with pytest.raises(
        RequestError, match=r"record 0 \(case_id 7\): subject 'Nobody' does not occur in field 'prompt'"
    ):
        read_requests(path)


def test_easyedit_locality_length_mismatch(tmp_path: Path) -> None:
    record = _record(EASYEDIT_RECORD, locality_prompt=["a", "b"], locality_ground_truth=["x"])
    path = _write_json(tmp_path, [record])
    with pytest.raises(RequestError, match=r"record 0 .*'locality_prompt' and 'locality_ground_truth' .*\(2 and 1\)"):
        read_requests(path)


def test_easyedit_rephrase_wrong_type(tmp_path: Path) -> None:
    path = _write_json(tmp_path, [_record(EASYEDIT_RECORD, rephrase_prompt={"text": "x"})])
    with pytest.raises(RequestError, match="field 'rephrase_prompt' must be a string or a list of strings, got object"):
        read_requests(path)


def test_easyedit_empty_target(tmp_path: Path) -> None:
    path = _write_json(tmp_path, [_record(EASYEDIT_RECORD, target_new="")])
    with pytest.raises(RequestError, match=r"record 0 \(case_id 7\): field 'target_new' is empty"):
        read_requests(path)


def test_jsonl_missing_field_names_line(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path, [CANONICAL_RECORD, _record(CANONICAL_RECORD, target_new=...)])
    with pytest.raises(
        RequestError, match=r"data\.jsonl: record 1 \(line 2, case_id cf-1\): missing field 'target_new'"
    ):
        read_requests(path)


def test_jsonl_subject_not_in_prompt(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path, [_record(CANONICAL_RECORD, prompt="The capital of Italy is")])
    with pytest.raises(
        RequestError, match=r"record 0 \(line 1, case_id cf-1\): subject 'France' does not occur in field 'prompt'"
    ):
        read_requests(path)


def test_jsonl_rephrase_prompts_not_list_of_strings(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path, [_record(CANONICAL_RECORD, rephrase_prompts=["ok", None])])
    with pytest.raises(RequestError, match=r"record 0 .*field 'rephrase_prompts\[1\]' must be a string, got null"):
        read_requests(path)


def test_jsonl_empty_target_true(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path, [_record(CANONICAL_RECORD, target_true=" ")])
    with pytest.raises(RequestError, match=r"record 0 .*field 'target_true' is empty"):
        read_requests(path)


@pytest.mark.parametrize(
    ("locality", "message"),
    [
        ("x", r"field 'locality' must be a list of objects, got string"),
        (["x"], r"field 'locality\[0\]' must be an object, got string"),
        ([{"prompt": "p"}], r"missing field 'locality\[0\]\.answer'"),
        ([{"prompt": "p", "answer": 1}], r"field 'locality\[0\]\.answer' must be a string, got number"),
    ],
)
def test_jsonl_bad_locality(tmp_path: Path, locality: Any, message: str) -> None:
    path = _write_jsonl(tmp_path, [_record(CANONICAL_RECORD, locality=locality)])
    with pytest.raises(RequestError, match=r"record 0 \(line 1, case_id cf-1\): " + message):
        read_requests(path)


def test_jsonl_several_placeholders(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path, [_record(CANONICAL_RECORD, prompt="{} and {}")])
    with pytest.raises(RequestError, match=r"record 0 .*field 'prompt' must contain '\{\}' exactly once, found 2"):
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
