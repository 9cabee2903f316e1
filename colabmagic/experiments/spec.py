"""The ``experiments.json`` format: schema, validation with entry/field/line errors, atomic save.

The file is a JSON list of entries; the seed's ``{"name", "command", "status", "timeout"}`` is valid
as is. Optional fields: ``env``, ``cwd``, ``retries``, ``gpus``, ``depends_on``, ``tags`` and
``rerun`` (a counter: bump it to run a finished experiment again).

The user (or ``exp add/grid/cancel/rerun``) writes this file; the daemon never does. ``exp sync``
only rewrites the ``status`` fields, by name (see :mod:`colabmagic.experiments.sync`).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema

from colabmagic.errors import ExperimentSpecError

STATUSES = ("pending", "running", "completed", "failed", "timeout", "cancelled", "interrupted")
TERMINAL = frozenset({"completed", "failed", "timeout", "cancelled", "interrupted"})
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.=+-]{0,127}$"
FIELDS = ("name", "command", "status", "timeout", "env", "cwd", "retries", "gpus", "depends_on",
          "tags", "rerun")  # fmt: skip

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "array",
    "items": {
        "type": "object",
        "required": ["name", "command"],
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string", "pattern": NAME_PATTERN},
            "command": {
                "anyOf": [
                    {"type": "string", "minLength": 1},
                    {"type": "array", "items": {"type": "string"}, "minItems": 1},
                ]
            },
            "status": {"enum": list(STATUSES)},
            "timeout": {"anyOf": [{"type": "number", "exclusiveMinimum": 0}, {"type": "null"}]},
            "env": {"type": "object", "additionalProperties": {"type": "string"}},
            "cwd": {"type": "string"},
            "retries": {"type": "integer", "minimum": 0, "maximum": 100},
            "gpus": {"type": "integer", "minimum": 0},
            "depends_on": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
            "tags": {"type": "array", "items": {"type": "string"}},
            "rerun": {"type": "integer", "minimum": 0},
        },
    },
}

_UMASK = os.umask(0o022)
os.umask(_UMASK)
_VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
_FIX = {
    "name": "use letters, digits and _ . = + - (at most 128, not starting with a symbol)",
    "command": "give a shell command string or a list of arguments",
    "status": f"use one of {', '.join(STATUSES)}",
    "timeout": "give seconds as a positive number (or null for none)",
    "env": "give an object of string values",
    "cwd": "give a directory path string",
    "retries": "give an integer from 0 to 100",
    "gpus": "give a non-negative integer",
    "depends_on": "give a list of distinct experiment names",
    "tags": "give a list of strings",
    "rerun": "give a non-negative integer",
}


@dataclass(frozen=True)
class Experiment:
    """One entry of ``experiments.json``.

    Parameters
    ----------
    name : str
        Unique name; also the directory ``outputs/<name>/``.
    command : str or list of str
        A shell command (run by ``/bin/sh -c``) or an argument list (run directly).
    status : str
        What the file says; ``pending`` asks for a run, ``cancelled`` asks for a cancel.
    timeout : float or None
        Seconds before the process group is terminated.
    env, cwd, retries, gpus, depends_on, tags, rerun
        See the module documentation and ``docs/experiments.md``.
    """

    name: str
    command: str | tuple[str, ...]
    status: str = "pending"
    timeout: float | None = None
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    retries: int = 0
    gpus: int = 1
    depends_on: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    rerun: int = 0

    @classmethod
    def from_dict(cls, entry: dict[str, Any]) -> Experiment:
        """Build from a validated entry dictionary."""
        command = entry["command"]
        return cls(
            name=entry["name"],
            command=command if isinstance(command, str) else tuple(command),
            status=entry.get("status", "pending"),
            timeout=entry.get("timeout"),
            env=dict(entry.get("env", {})),
            cwd=entry.get("cwd"),
            retries=entry.get("retries", 0),
            gpus=entry.get("gpus", 1),
            depends_on=tuple(entry.get("depends_on", ())),
            tags=tuple(entry.get("tags", ())),
            rerun=entry.get("rerun", 0),
        )

    def to_dict(self) -> dict[str, Any]:
        """The entry as written to ``experiments.json`` (defaults left out)."""
        out: dict[str, Any] = {
            "name": self.name,
            "command": self.command if isinstance(self.command, str) else list(self.command),
            "status": self.status,
            "timeout": self.timeout,
        }
        defaults = Experiment(name="x", command="x")
        for key in ("env", "cwd", "retries", "gpus", "depends_on", "tags", "rerun"):
            value = getattr(self, key)
            if value != getattr(defaults, key):
                out[key] = list(value) if isinstance(value, tuple) else value
        return out


def _entry_offsets(text: str) -> list[tuple[int, int]]:
    """Character spans of the top-level list items (best effort; empty if not a list)."""
    decoder = json.JSONDecoder()
    spans: list[tuple[int, int]] = []
    pos = text.find("[")
    if pos < 0:
        return spans
    pos += 1
    ws = re.compile(r"[\s,]*")
    while True:
        pos = ws.match(text, pos).end()  # type: ignore[union-attr]
        if pos >= len(text) or text[pos] == "]":
            return spans
        try:
            _, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return spans
        spans.append((pos, end))
        pos = end


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _locate(text: str, spans: list[tuple[int, int]], index: int, key: str | None) -> int | None:
    """Line of entry *index* (of its *key* when given) in *text*."""
    if index >= len(spans):
        return None
    start, end = spans[index]
    if key is not None:
        hit = text.find(json.dumps(key), start, end)
        if hit >= 0:
            return _line_of(text, hit)
    return _line_of(text, start)


def _describe(entries: Sequence[Any], index: int) -> str:
    entry = entries[index]
    if isinstance(entry, dict) and isinstance(entry.get("name"), str):
        return f"entry {index} ({entry['name']!r})"
    return f"entry {index}"


def validate_entries(entries: Any, *, text: str = "", source: str = "experiments.json") -> None:
    """Check *entries* (the parsed file) against the schema and the cross-entry rules.

    Parameters
    ----------
    entries : Any
        The parsed JSON document.
    text : str, optional
        The raw file text, used to report line numbers.
    source : str, optional
        File name used in messages.

    Raises
    ------
    ExperimentSpecError
        On the first problem, naming the entry, the field, the line and the fix.
    """
    spans = _entry_offsets(text) if text else []

    def where(index: int, key: str | None) -> str:
        line = _locate(text, spans, index, key) if text else None
        return f"{source} line {line}" if line else source

    errors = sorted(_VALIDATOR.iter_errors(entries), key=lambda e: list(map(str, e.path)))
    if errors:
        err = errors[0]
        path = list(err.path)
        if not path:
            got = type(entries).__name__
            msg = f"{source}: the top level must be a JSON list of experiments, got {got}"
            raise ExperimentSpecError(msg)
        index = int(path[0])
        key = str(path[1]) if len(path) > 1 else None
        if key is None and err.validator == "required":
            missing = [k for k in err.validator_value if k not in entries[index]]
            key_msg = f"missing required field {missing[0]!r}"
            fix = _FIX.get(missing[0], "")
        elif key is None and err.validator == "additionalProperties":
            extra = sorted(set(entries[index]) - set(FIELDS))
            key = extra[0]
            key_msg = f"unknown field {key!r}"
            fix = f"valid fields are {', '.join(FIELDS)}"
        elif key is None:
            key_msg = "must be a JSON object"
            fix = 'write {"name": ..., "command": ...}'
        else:
            key_msg = f"field {key!r} is invalid ({err.message})"
            fix = _FIX.get(key, "")
        msg = f"{where(index, key)}: {_describe(entries, index)}: {key_msg}; {fix}"
        raise ExperimentSpecError(msg)

    seen: dict[str, int] = {}
    for index, entry in enumerate(entries):
        name = entry["name"]
        if name in seen:
            msg = (
                f"{where(index, 'name')}: entry {index}: duplicate name {name!r} "
                f"(also entry {seen[name]}); names must be unique, rename one"
            )
            raise ExperimentSpecError(msg)
        seen[name] = index
    for index, entry in enumerate(entries):
        for dep in entry.get("depends_on", ()):
            if dep not in seen or dep == entry["name"]:
                what = "itself" if dep == entry["name"] else f"unknown experiment {dep!r}"
                msg = (
                    f"{where(index, 'depends_on')}: {_describe(entries, index)}: "
                    f"'depends_on' names {what}; list names of other experiments in this file"
                )
                raise ExperimentSpecError(msg)
    cycle = _find_cycle({e["name"]: list(e.get("depends_on", ())) for e in entries})
    if cycle:
        index = seen[cycle[0]]
        msg = (
            f"{where(index, 'depends_on')}: {_describe(entries, index)}: 'depends_on' forms a "
            f"cycle {' -> '.join(cycle)}; remove one of these dependencies"
        )
        raise ExperimentSpecError(msg)


def _find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in graph.get(node, ()):
            if state.get(dep) == 1:
                return [*stack[stack.index(dep) :], dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in graph:
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def parse_experiments(text: str, *, source: str = "experiments.json") -> list[Experiment]:
    """Parse and validate the text of an ``experiments.json``.

    Parameters
    ----------
    text : str
        File contents.
    source : str, optional
        File name used in error messages.

    Returns
    -------
    list of Experiment

    Raises
    ------
    ExperimentSpecError
        Invalid JSON or an invalid entry; the message names the line and the fix.
    """
    return [Experiment.from_dict(e) for e in parse_entries(text, source=source)]


def parse_entries(text: str, *, source: str = "experiments.json") -> list[dict[str, Any]]:
    """Like :func:`parse_experiments` but return the validated raw dictionaries."""
    if not text.strip():
        return []
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"{source} line {exc.lineno} column {exc.colno}"
        msg = f"{where}: invalid JSON ({exc.msg}); fix the syntax"
        raise ExperimentSpecError(msg) from None
    validate_entries(entries, text=text, source=source)
    return entries


def read_entries(path: str | os.PathLike[str]) -> tuple[str, list[dict[str, Any]]]:
    """Read and validate *path*: its text and entries; a missing file is ``("", [])``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return "", []
    return text, parse_entries(text, source=path.name)


def load_entries(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read and validate *path*; a missing file is an empty list."""
    return read_entries(path)[1]


def load_experiments(path: str | os.PathLike[str]) -> list[Experiment]:
    """Read and validate ``experiments.json`` at *path*.

    Parameters
    ----------
    path : path-like
        The file; a missing file is an empty queue.

    Returns
    -------
    list of Experiment
    """
    return [Experiment.from_dict(e) for e in load_entries(path)]


def dumps_entries(entries: Iterable[dict[str, Any]]) -> str:
    """The canonical text of an ``experiments.json`` (two-space indent, one trailing newline)."""
    return json.dumps(list(entries), indent=2) + "\n"


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write *text* to *path* through a temporary file and ``os.replace``.

    Readers see the old or the new file, never a partial one.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_entries(path: str | os.PathLike[str], entries: Sequence[dict[str, Any]]) -> None:
    """Validate *entries* and write them atomically to *path*."""
    validate_entries(list(entries), source=Path(path).name)
    atomic_write_text(path, dumps_entries(entries))


# -- edits that keep the user's formatting ------------------------------------------------------
def _ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _members(text: str, start: int) -> list[tuple[str, int, int, int]]:
    """``(key, key_start, value_start, value_end)`` of the object starting at *start*."""
    decoder = json.JSONDecoder()
    out = []
    pos = _ws(text, start + 1)
    if text[pos] == "}":
        return out
    while True:
        key_start = pos
        key, pos = decoder.raw_decode(text, pos)
        pos = _ws(text, pos) + 1  # ':'
        value_start = _ws(text, pos)
        _, value_end = decoder.raw_decode(text, value_start)
        out.append((key, key_start, value_start, value_end))
        pos = _ws(text, value_end)
        if text[pos] == "}":
            return out
        pos = _ws(text, pos + 1)  # ','


def set_fields_text(text: str, updates: dict[str, dict[str, Any]]) -> str:
    """Set fields of entries (by name) in the text of a valid ``experiments.json``.

    Only the values change; the rest of the text (formatting, key order) stays byte for byte,
    so a ``git diff`` shows exactly the fields that changed. A missing field is inserted after
    the entry's ``name``.

    Parameters
    ----------
    text : str
        File contents (already validated).
    updates : dict
        ``{name: {field: value}}``.

    Returns
    -------
    str
    """
    edits: list[tuple[int, int, str]] = []
    for start, _end in _entry_offsets(text):
        members = _members(text, start)
        name = next((json.loads(text[v0:v1]) for k, _, v0, v1 in members if k == "name"), None)
        if name not in updates:
            continue
        fields = dict(updates[name])
        name_end = None
        for key, _k0, v0, v1 in members:
            if key == "name":
                name_end = v1
            if key in fields:
                edits.append((v0, v1, json.dumps(fields.pop(key))))
        if fields and name_end is not None:
            extra = "".join(f", {json.dumps(k)}: {json.dumps(v)}" for k, v in fields.items())
            edits.append((name_end, name_end, extra))
    for v0, v1, new in sorted(edits, reverse=True):
        text = text[:v0] + new + text[v1:]
    return text


def append_entries_text(text: str, entries: Sequence[dict[str, Any]]) -> str:
    """Append *entries* to the JSON list in *text*, keeping what is there byte for byte."""
    if not text.strip():
        return dumps_entries(entries)
    end = text.rstrip().rfind("]")
    body = ",\n".join("  " + json.dumps(e, indent=2).replace("\n", "\n  ") for e in entries)
    head = text[:end].rstrip()
    sep = "\n" if head.endswith("[") else ",\n"
    return head + sep + body + "\n" + text[end:]
