"""experiments.json: the seed format, validation messages with entry/field/line, edits, grids."""

from __future__ import annotations

import json

import pytest

from colabmagic.errors import ExperimentSpecError, ParameterError
from colabmagic.experiments.grid import expand_grid, parse_param
from colabmagic.experiments.spec import (
    Experiment,
    append_entries_text,
    parse_entries,
    parse_experiments,
    set_fields_text,
)

SEED = """[
  {"name": "hparam_0.001_16", "command": "python train.py --lr 0.001 --bs 16",
   "status": "pending", "timeout": 3600},
  {"name": "hparam_0.01_16", "command": "python train.py --lr 0.01 --bs 16",
   "status": "completed", "timeout": 3600}
]
"""


def test_seed_format_loads_as_is():
    exps = parse_experiments(SEED)
    assert [e.name for e in exps] == ["hparam_0.001_16", "hparam_0.01_16"]
    assert exps[0].timeout == 3600
    assert exps[1].status == "completed"
    assert exps[0].gpus == 1
    assert exps[0].retries == 0


def test_optional_fields_round_trip():
    entry = {"name": "a", "command": ["python", "x.py"], "status": "pending", "timeout": None,
             "env": {"K": "v"}, "cwd": "sub", "retries": 2, "gpus": 0, "depends_on": [],
             "tags": ["t"], "rerun": 1}  # fmt: skip
    exp = Experiment.from_dict(entry)
    assert exp.command == ("python", "x.py")
    again = Experiment.from_dict(exp.to_dict())
    assert again == exp


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[\n {"name": "a",\n  "command": "x",\n  "timeout": -1}\n]', "line 4: entry 0 ('a'): field 'timeout'"),  # noqa: E501
        ('[\n {"name": "a", "command": "x"},\n {"name": "b",\n  "timout": 5, "command": "y"}\n]',
         "line 4: entry 1 ('b'): unknown field 'timout'"),
        ('[\n {"name": "a", "command": "x"},\n {"name": "a", "command": "y"}\n]', "duplicate name 'a'"),  # noqa: E501
        ('[\n {"name": "a", "command": "x"}\n {"name": "b"}\n]', "line 3 column 2: invalid JSON"),
        ('[{"name": "a", "command": "x", "depends_on": ["zz"]}]', "unknown experiment 'zz'"),
        ('[{"name": "a", "command": "x", "depends_on": ["b"]},'
         ' {"name": "b", "command": "x", "depends_on": ["a"]}]', "cycle a -> b -> a"),
        ('[{"name": "a b", "command": "x"}]', "field 'name' is invalid"),
        ('[{"name": "a", "command": "x", "status": "done"}]', "use one of pending, running"),
        ('[{"command": "x"}]', "missing required field 'name'"),
        ('{"name": "a"}', "top level must be a JSON list"),
    ],
)  # fmt: skip
def test_invalid_files_name_entry_field_line_and_fix(text, expected):
    with pytest.raises(ExperimentSpecError) as info:
        parse_experiments(text)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message
    assert message.startswith("experiments.json")


def test_set_fields_text_changes_only_values():
    text = SEED.replace('"status": "pending", ', "")
    out = set_fields_text(text, {"hparam_0.001_16": {"status": "running"},
                                 "hparam_0.01_16": {"status": "failed"}})  # fmt: skip
    entries = parse_entries(out)
    assert [e["status"] for e in entries] == ["running", "failed"]
    # everything but the status values is byte-identical
    assert out.replace('"name": "hparam_0.001_16", "status": "running"', '"name": "hparam_0.001_16"').replace(  # noqa: E501
        '"failed"', '"completed"'
    ) == text  # fmt: skip


def test_set_fields_text_is_not_fooled_by_strings():
    text = '[{"name": "a", "tags": ["status"], "command": "echo \\"status\\": 1", "status": "pending"}]'  # noqa: E501
    out = set_fields_text(text, {"a": {"status": "completed"}})
    entry = json.loads(out)[0]
    assert entry["status"] == "completed"
    assert entry["tags"] == ["status"]
    assert entry["command"] == 'echo "status": 1'


def test_append_entries_keeps_existing_text():
    out = append_entries_text(SEED, [{"name": "c", "command": "z"}])
    assert out.startswith(SEED.rstrip()[:-1].rstrip())
    assert [e["name"] for e in parse_entries(out)][-1] == "c"
    assert (
        parse_entries(append_entries_text("[]\n", [{"name": "d", "command": "z"}]))[0]["name"]
        == "d"
    )


def test_grid_expands_the_seed_sweep():
    lr = ["0.0001", "0.0005", "0.001", "0.005", "0.01"]
    bs = [str(b) for b in (8, 16, 24, 32, 48, 64, 96, 128, 192, 256)]
    exps = expand_grid("python train.py --lr {lr} --bs {bs} ${HOME}", {"lr": lr, "bs": bs},
                       name="hparam_{lr}_{bs}", timeout=3600)  # fmt: skip
    assert len(exps) == 50
    assert exps[0].name == "hparam_0.0001_8"
    assert exps[0].command == "python train.py --lr 0.0001 --bs 8 ${HOME}"
    assert all(e.timeout == 3600 for e in exps)


def test_grid_errors():
    assert parse_param("lr=0.1, 0.2") == ("lr", ["0.1", "0.2"])
    with pytest.raises(ParameterError, match="NAME=V1,V2"):
        parse_param("lr")
    with pytest.raises(ParameterError, match="appears in neither"):
        expand_grid("python x.py {lr}", {"lr": ["1"], "bs": ["2"]}, name="x_{lr}")
    with pytest.raises(ParameterError, match="twice"):
        expand_grid("python x.py {lr} {bs}", {"lr": ["1"], "bs": ["2", "3"]}, name="x_{lr}")
