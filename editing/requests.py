"""Edit requests and the readers that load them from every supported dataset layout.

Knowledge-editing datasets come in several layouts: ROME's CounterFact records, MEND's zsRE records,
EasyEdit's flattened records and this project's canonical JSON Lines. Editing methods, metrics and callbacks
should not care which layout a run started from, so every reader converts its layout into one frozen,
validated record type, :class:`EditRequest`, with the subject position marked by a ``"{}"`` template.

Each reader validates every record it returns before returning anything. A malformed record fails with a
:class:`RequestError` that names the file, the record (0-based index, the line for JSON Lines, the case id
where known) and the offending field, instead of surfacing later as a ``KeyError`` deep inside a training
loop or, worse, as an edit that silently targets the wrong text.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

FORMATS = ("counterfact", "zsre", "easyedit", "jsonl")

_PLACEHOLDER = "{}"
_BUILTIN_FILE = Path(__file__).parent / "builtin" / "counterfact_builtin.jsonl"
# Checked in order: bool before int, since bool is a subclass of int.
_JSON_TYPES: tuple[tuple[type, str], ...] = (
    (type(None), "null"),
    (bool, "boolean"),
    (int, "number"),
    (float, "number"),
    (str, "string"),
    (list, "array"),
    (dict, "object"),
)


class RequestError(ValueError):
    """An edit request, or the file holding it, is invalid.

    The message names the file, the record (0-based index, plus the line number for JSON Lines and the case
    id where known) and the field, e.g.
    ``"counterfact.json: record 12 (case_id 3648): field 'requested_rewrite.target_new.str' is empty"``.
    Errors raised directly by :class:`EditRequest` or :class:`LocalityProbe` name only the field.
    """


def _json_type(value: object) -> str:
    """JSON's name for a value's type, so messages speak the file's language, not Python's."""
    return next((name for kind, name in _JSON_TYPES if isinstance(value, kind)), type(value).__name__)


def _text_problem(value: object, field: str) -> str | None:
    """The problem with a text value, or None; returned rather than raised so callers can add the location."""
    if not isinstance(value, str):
        return f"field '{field}' must be a string, got {_json_type(value)}"
    if not value.strip():
        return f"field '{field}' is empty"
    return None


def _check_text_fields(obj: object, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    """Raises on the first text field of ``obj`` that is not a non-blank string (``optional`` ones may be None)."""
    for name in required + optional:
        value = getattr(obj, name)
        problem = None if value is None and name in optional else _text_problem(value, name)
        if problem:
            raise RequestError(problem)


def _texts_tuple(value: object, field: str) -> tuple[str, ...]:
    """Tuple-ises a sequence of texts so requests stay hashable, failing on the first bad item."""
    if not isinstance(value, list | tuple):
        raise RequestError(f"field '{field}' must be a sequence of strings, got {_json_type(value)}")
    for i, item in enumerate(value):
        problem = _text_problem(item, f"{field}[{i}]")
        if problem:
            raise RequestError(problem)
    return tuple(value)


@dataclass(frozen=True)
class LocalityProbe:
    """A prompt whose continuation must not change when an edit is applied.

    Attributes:
        prompt: Plain prompt text (no subject placeholder).
        answer: Expected continuation; tokenized later with a leading space.
        gold_prompt: Prompt on which the gold answer is scored by the token-family specificity metric, when it
            differs from ``prompt``. LyapLock/AlphaEdit's ZsRE "Spe." column scores the gold answer on
            ``loc + "?"``, as MEMIT's ZsRE harness does. None means use ``prompt``.
    """

    prompt: str
    answer: str
    gold_prompt: str | None = None

    def __post_init__(self) -> None:
        """Fails at construction so a bad probe never reaches a metric."""
        _check_text_fields(self, ("prompt", "answer"), optional=("gold_prompt",))


@dataclass(frozen=True)
class EditRequest:
    """One fact to write into a model, with the prompts used to evaluate the edit.

    Sequence fields may be given as lists; they are stored as tuples so requests stay immutable and hashable.

    Attributes:
        case_id: Identifier of the request within its dataset, always a string.
        prompt: Template containing exactly one ``"{}"`` where the subject goes.
        subject: The entity whose fact is edited.
        target_new: The new object the model should produce after the edit.
        target_true: The original object, when known.
        rephrase_prompts: Paraphrases of the filled prompt (generalization probes).
        locality: Unrelated prompts whose answers must not change (specificity probes).
        generation_prompts: Open-ended prompts for fluency/consistency evaluation.
    """

    case_id: str
    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    rephrase_prompts: tuple[str, ...] = ()
    locality: tuple[LocalityProbe, ...] = ()
    generation_prompts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        """Validates at construction, so a bad request fails where it is made, not inside a training step."""
        _check_text_fields(self, ("case_id", "prompt", "subject", "target_new"), optional=("target_true",))
        count = self.prompt.count(_PLACEHOLDER)
        if count != 1:
            raise RequestError(f"field 'prompt' must contain '{_PLACEHOLDER}' exactly once, found {count}")
        if not isinstance(self.locality, list | tuple):
            raise RequestError(f"field 'locality' must be a sequence of LocalityProbe, got {_json_type(self.locality)}")
        for i, probe in enumerate(self.locality):
            if not isinstance(probe, LocalityProbe):
                raise RequestError(f"field 'locality[{i}]' must be a LocalityProbe, got {_json_type(probe)}")
        object.__setattr__(self, "locality", tuple(self.locality))
        object.__setattr__(self, "rephrase_prompts", _texts_tuple(self.rephrase_prompts, "rephrase_prompts"))
        object.__setattr__(self, "generation_prompts", _texts_tuple(self.generation_prompts, "generation_prompts"))

    @property
    def text(self) -> str:
        """The prompt with the subject filled in.

        Uses ``str.replace`` rather than ``str.format`` because prompts may contain other braces.
        """
        return self.prompt.replace(_PLACEHOLDER, self.subject, 1)


@dataclass
class _Where:
    """Where a record sits in its file, to prefix error messages."""

    file: str
    index: int
    line: int | None = None
    case_id: str | None = None

    def error(self, message: str) -> RequestError:
        """An error prefixed with the file, record, line and case id, so the bad record can be found."""
        details = [] if self.line is None else [f"line {self.line}"]
        if self.case_id is not None:
            details.append(f"case_id {self.case_id}")
        suffix = f" ({', '.join(details)})" if details else ""
        return RequestError(f"{self.file}: record {self.index}{suffix}: {message}")


def _get(record: dict[str, Any], field: str, where: _Where, *, required: bool) -> Any:
    """Follows a dotted path (``requested_rewrite.target_new.str``); None for an absent optional field."""
    parts = field.split(".")
    value: Any = record
    for depth, key in enumerate(parts):
        if not isinstance(value, dict):
            parent = ".".join(parts[:depth])
            raise where.error(f"field '{parent}' must be an object, got {_json_type(value)}")
        if key not in value:
            if required:
                raise where.error(f"missing field '{'.'.join(parts[: depth + 1])}'")
            return None
        value = value[key]
    return value


def _checked(value: object, field: str, where: _Where) -> str:
    """``_text_problem`` for a value read from a file, so the error names the record."""
    problem = _text_problem(value, field)
    if problem:
        raise where.error(problem)
    return cast(str, value)


def _text(record: dict[str, Any], field: str, where: _Where) -> str:
    """A required text field; blank text is refused too, since it would edit or probe nothing."""
    return _checked(_get(record, field, where, required=True), field, where)


def _optional_text(record: dict[str, Any], field: str, where: _Where) -> str | None:
    """An optional text field; null counts as absent, as exporters write it for missing values."""
    value = _get(record, field, where, required=False)
    return None if value is None else _checked(value, field, where)


def _texts(record: dict[str, Any], field: str, where: _Where, *, single: bool = False) -> tuple[str, ...]:
    """An optional list of strings (or, with ``single``, a bare string); absent or null is empty."""
    value = _get(record, field, where, required=False)
    if value is None:
        return ()
    if single and isinstance(value, str):
        return (_checked(value, field, where),)
    if not isinstance(value, list):
        expected = "a string or a list of strings" if single else "a list of strings"
        raise where.error(f"field '{field}' must be {expected}, got {_json_type(value)}")
    return tuple(_checked(item, f"{field}[{i}]", where) for i, item in enumerate(value))


def _case_id(record: dict[str, Any], where: _Where, default: int | None = None) -> str:
    """Reads the case id as a string and stores it in ``where`` so later errors name it."""
    value = _get(record, "case_id", where, required=default is None)
    if value is None and default is not None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise where.error(f"field 'case_id' must be a string or an integer, got {_json_type(value)}")
    case_id = _checked(str(value), "case_id", where)
    where.case_id = case_id
    return case_id


def _template(record: dict[str, Any], field: str, where: _Where) -> str:
    """A field that is already a template; exactly one ``{}`` so the subject position is unambiguous."""
    template = _text(record, field, where)
    count = template.count(_PLACEHOLDER)
    if count != 1:
        raise where.error(f"field '{field}' must contain '{_PLACEHOLDER}' exactly once, found {count}")
    return template


def _to_template(filled: str, subject: str, field: str, where: _Where) -> str:
    """Marks the first subject occurrence in a filled prompt, refusing a literal ``{}`` that would be ambiguous."""
    if _PLACEHOLDER in filled:
        raise where.error(f"field '{field}' contains '{_PLACEHOLDER}', which is reserved for the subject")
    if subject not in filled:
        raise where.error(f"subject '{subject}' does not occur in field '{field}'")
    return filled.replace(subject, _PLACEHOLDER, 1)


def _build(where: _Where, **fields: Any) -> EditRequest:
    """Builds the request, prefixing EditRequest's own field errors with the record location."""
    try:
        return EditRequest(**fields)
    except RequestError as exc:
        raise where.error(str(exc)) from None


def _from_counterfact(record: dict[str, Any], where: _Where) -> EditRequest:
    """ROME's CounterFact layout; neighbourhood prompts are probes answered by the true target."""
    case_id = _case_id(record, where)
    prompt = _template(record, "requested_rewrite.prompt", where)
    subject = _text(record, "requested_rewrite.subject", where)
    target_new = _text(record, "requested_rewrite.target_new.str", where)
    target_true = _text(record, "requested_rewrite.target_true.str", where)
    neighborhood = _texts(record, "neighborhood_prompts", where)
    return _build(
        where,
        case_id=case_id,
        prompt=prompt,
        subject=subject,
        target_new=target_new,
        target_true=target_true,
        rephrase_prompts=_texts(record, "paraphrase_prompts", where),
        locality=tuple(LocalityProbe(p, target_true) for p in neighborhood),
        generation_prompts=_texts(record, "generation_prompts", where),
    )


def _from_zsre(record: dict[str, Any], where: _Where) -> EditRequest:
    """MEND's zsRE layout, which has no case ids: the record index stands in."""
    case_id = str(where.index)
    where.case_id = case_id
    subject = _text(record, "subject", where)
    prompt = _to_template(_text(record, "src", where), subject, "src", where)
    answers = _texts(record, "answers", where)
    rephrase = _optional_text(record, "rephrase", where)
    loc = _optional_text(record, "loc", where)
    loc_ans = _optional_text(record, "loc_ans", where)
    if (loc is None) != (loc_ans is None):
        present, absent = ("loc", "loc_ans") if loc_ans is None else ("loc_ans", "loc")
        raise where.error(f"missing field '{absent}' (required when '{present}' is given)")
    return _build(
        where,
        case_id=case_id,
        prompt=prompt,
        subject=subject,
        target_new=_text(record, "alt", where),
        target_true=answers[0] if answers else None,
        rephrase_prompts=() if rephrase is None else (rephrase,),
        locality=() if loc is None or loc_ans is None else (LocalityProbe(loc, loc_ans, gold_prompt=loc + "?"),),
    )


def _from_easyedit(record: dict[str, Any], where: _Where) -> EditRequest:
    """EasyEdit's flattened layout, where each list field may also be a bare string."""
    case_id = _case_id(record, where, default=where.index)
    subject = _text(record, "subject", where)
    prompt = _to_template(_text(record, "prompt", where), subject, "prompt", where)
    loc_prompts = _texts(record, "locality_prompt", where, single=True)
    loc_answers = _texts(record, "locality_ground_truth", where, single=True)
    if len(loc_prompts) != len(loc_answers):
        raise where.error(
            "fields 'locality_prompt' and 'locality_ground_truth' have different lengths "
            f"({len(loc_prompts)} and {len(loc_answers)})"
        )
    return _build(
        where,
        case_id=case_id,
        prompt=prompt,
        subject=subject,
        target_new=_text(record, "target_new", where),
        target_true=_optional_text(record, "ground_truth", where),
        rephrase_prompts=_texts(record, "rephrase_prompt", where, single=True),
        locality=tuple(LocalityProbe(p, a) for p, a in zip(loc_prompts, loc_answers, strict=True)),
    )


def _probes(record: dict[str, Any], field: str, where: _Where) -> tuple[LocalityProbe, ...]:
    """Locality probes as ``{"prompt", "answer", "gold_prompt"?}`` objects."""
    items = _get(record, field, where, required=False)
    if items is None:
        return ()
    if not isinstance(items, list):
        raise where.error(f"field '{field}' must be a list of objects, got {_json_type(items)}")
    probes = []
    for i, item in enumerate(items):
        name = f"{field}[{i}]"
        if not isinstance(item, dict):
            raise where.error(f"field '{name}' must be an object, got {_json_type(item)}")
        for key in ("prompt", "answer"):
            if key not in item:
                raise where.error(f"missing field '{name}.{key}'")
        prompt = _checked(item["prompt"], f"{name}.prompt", where)
        answer = _checked(item["answer"], f"{name}.answer", where)
        gold = item.get("gold_prompt")
        gold_prompt = None if gold is None else _checked(gold, f"{name}.gold_prompt", where)
        probes.append(LocalityProbe(prompt, answer, gold_prompt=gold_prompt))
    return tuple(probes)


def _from_canonical(record: dict[str, Any], where: _Where) -> EditRequest:
    """The canonical layout; a filled prompt holding the subject is turned into a template."""
    case_id = _case_id(record, where)
    subject = _text(record, "subject", where)
    prompt = _text(record, "prompt", where)
    if _PLACEHOLDER in prompt:
        prompt = _template(record, "prompt", where)
    else:
        prompt = _to_template(prompt, subject, "prompt", where)
    return _build(
        where,
        case_id=case_id,
        prompt=prompt,
        subject=subject,
        target_new=_text(record, "target_new", where),
        target_true=_optional_text(record, "target_true", where),
        rephrase_prompts=_texts(record, "rephrase_prompts", where),
        locality=_probes(record, "locality", where),
        generation_prompts=_texts(record, "generation_prompts", where),
    )


_READERS: dict[str, Callable[[dict[str, Any], _Where], EditRequest]] = {
    "counterfact": _from_counterfact,
    "zsre": _from_zsre,
    "easyedit": _from_easyedit,
    "jsonl": _from_canonical,
}


def _read_text(path: Path) -> str:
    """Reads UTF-8 (ignoring a byte-order mark), turning OS errors into messages naming the file."""
    if not path.exists():
        raise RequestError(f"{path.name}: file does not exist: {path}")
    if not path.is_file():
        raise RequestError(f"{path.name}: not a regular file: {path}")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise RequestError(f"{path.name}: not valid UTF-8 (byte offset {exc.start})") from None
    except OSError as exc:
        raise RequestError(f"{path.name}: cannot be read: {exc.strerror}") from None


def _json_list(text: str, name: str) -> list[Any]:
    """Parses a JSON list of records; hints at JSON Lines when a second document follows the first."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        hint = " (JSON Lines files need a .jsonl suffix or format='jsonl')" if exc.msg == "Extra data" else ""
        raise RequestError(f"{name}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}{hint}") from None
    if not isinstance(data, list):
        raise RequestError(f"{name}: top level must be a JSON list of records, got {_json_type(data)}")
    return data


def _json_lines(text: str, name: str, limit: int | None) -> Iterator[tuple[Any, _Where]]:
    """Parses JSON Lines lazily, so ``limit`` also bounds the parsing; blank lines are skipped."""
    index = 0
    for line_no, line in enumerate(text.split("\n"), start=1):
        if limit is not None and index >= limit:
            return
        if not line.strip():
            continue
        where = _Where(name, index, line=line_no)
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise where.error(f"invalid JSON at column {exc.colno}: {exc.msg}") from None
        yield record, where
        index += 1


def _detect(first: object, name: str) -> str:
    """Guesses the layout from the first record's keys, checking EasyEdit before canonical (it has their keys too)."""
    where = _Where(name, 0)
    if not isinstance(first, dict):
        raise where.error(f"record is not a JSON object, got {_json_type(first)}")
    keys = set(first)
    if "requested_rewrite" in keys:
        return "counterfact"
    if {"src", "alt"} <= keys:
        return "zsre"
    if {"prompt", "ground_truth"} <= keys:
        return "easyedit"
    if {"prompt", "subject", "target_new"} <= keys:
        return "jsonl"
    raise where.error(
        f"cannot detect the format from the record keys {sorted(keys)}; pass format= one of {', '.join(FORMATS)}"
    )


def read_requests(path: str | Path, format: str = "auto", limit: int | None = None) -> list[EditRequest]:
    """Reads and validates edit requests from a dataset file.

    Formats:
        ``counterfact``: ROME's CounterFact JSON list (``requested_rewrite``, ``paraphrase_prompts``,
        ``neighborhood_prompts``, ``generation_prompts``, ``case_id``).
        ``zsre``: MEND's zsRE JSON list (``src``, ``subject``, ``alt``, ``answers``, ``rephrase``, ``loc``,
        ``loc_ans``); the case id is the record index and the locality probe's ``gold_prompt`` is ``loc + "?"``.
        ``easyedit``: EasyEdit's JSON list (``prompt``, ``subject``, ``target_new``, ``ground_truth``,
        ``rephrase_prompt``, ``locality_prompt``, ``locality_ground_truth``, optional ``case_id``).
        ``jsonl``: canonical records, one JSON object per line (a JSON list of them is accepted too); each
        ``locality`` item is ``{"prompt", "answer"}`` with an optional ``"gold_prompt"``.
        ``auto``: ``.jsonl`` suffix means ``jsonl``; otherwise the layout of a JSON list is detected from the
        keys of its first record.

    Args:
        path: The file to read.
        format: One of ``"auto"`` or :data:`FORMATS`.
        limit: Read only the first ``limit`` records (only those are validated); None reads all.

    Returns:
        The requests, in file order, all validated.

    Raises:
        RequestError: If the format or limit is invalid, the file cannot be read or parsed, or any returned
            record is invalid. The message names the file, record and field.
    """
    path = Path(path)
    name = path.name
    if format != "auto" and format not in FORMATS:
        raise RequestError(f"{name}: unknown format {format!r}; expected 'auto' or one of {', '.join(FORMATS)}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise RequestError(f"{name}: limit must be an integer >= 1, got {limit!r}")
    text = _read_text(path)
    json_lines = format == "jsonl" or (format == "auto" and path.suffix.lower() == ".jsonl")
    if json_lines and not text.lstrip().startswith("["):
        reader = _READERS["jsonl"]
        located: Iterator[tuple[Any, _Where]] = _json_lines(text, name, limit)
    else:
        records = _json_list(text, name)[:limit]
        if not records:
            return []
        reader = _READERS[_detect(records[0], name) if format == "auto" else format]
        located = ((record, _Where(name, i)) for i, record in enumerate(records))
    requests = []
    for record, where in located:
        if not isinstance(record, dict):
            raise where.error(f"record is not a JSON object, got {_json_type(record)}")
        try:
            requests.append(reader(record, where))
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise where.error(f"malformed record ({type(exc).__name__}: {exc})") from exc
    return requests


def detect_format(path: str | Path) -> str:
    """The layout ``read_requests(path, "auto")`` would use (one of :data:`FORMATS`)."""
    path = Path(path)
    text = _read_text(path)
    if text.lstrip().startswith("["):
        records = _json_list(text, path.name)
        return _detect(records[0], path.name) if records else "jsonl"
    return "jsonl"


def as_requests(requests: EditRequest | dict[str, Any] | Iterable[EditRequest | dict[str, Any]]) -> list[EditRequest]:
    """Requests given in Python: one or a list of :class:`EditRequest` or dicts in the canonical JSON Lines layout
    (``case_id``, ``prompt``, ``subject``, ``target_new``, ...), validated as a file's records are.

    Raises:
        RequestError: a dict is not a valid canonical record; the message names its index (``requests: record 1``)
            and the field.
    """
    items = [requests] if isinstance(requests, EditRequest | dict) else list(requests)
    out = []
    for i, item in enumerate(items):
        where = _Where("requests", i)
        if isinstance(item, EditRequest):
            out.append(item)
        elif isinstance(item, dict):
            out.append(_from_canonical(item, where))
        else:
            raise where.error(f"expected an EditRequest or a dict, got {type(item).__name__}")
    return out


def builtin_requests(limit: int | None = None) -> list[EditRequest]:
    """Reads the CounterFact sample shipped with the package (``editing/builtin/counterfact_builtin.jsonl``).

    Args:
        limit: Read only the first ``limit`` requests; None reads all.

    Returns:
        The validated requests.

    Raises:
        RequestError: If the file is missing or invalid.
    """
    return read_requests(_BUILTIN_FILE, format="jsonl", limit=limit)
