"""``colabmagic exp`` through click's CliRunner."""

from __future__ import annotations

import json

from click.testing import CliRunner

from colabmagic.cli import main


def invoke(tmp_path, *args):
    return CliRunner().invoke(main, ["exp", "-C", str(tmp_path), *args], catch_exceptions=False)


def test_add_grid_run_list_logs_cancel(tmp_path):
    r = invoke(
        tmp_path, "add", "hello", "--timeout", "10", "--retries", "1", "--", "echo", "hi there"
    )
    assert r.exit_code == 0, r.output
    entry = json.loads((tmp_path / "experiments.json").read_text())[0]
    assert entry == {"name": "hello", "command": "echo 'hi there'", "status": "pending",
                     "timeout": 10.0, "retries": 1}  # fmt: skip
    r = invoke(tmp_path, "grid", "echo lr={lr} bs={bs}", "--param", "lr=0.1,0.2",
               "--param", "bs=16,32", "--name", "hp_{lr}_{bs}", "--gpus", "0")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "added 4 experiments" in r.output
    r = invoke(tmp_path, "cancel", "hp_0.2_32")
    assert r.exit_code == 0
    r = invoke(tmp_path, "run", "--slots", "2")
    assert r.exit_code == 0, r.output
    assert "hp_0.1_16" in r.output
    r = invoke(tmp_path, "list", "--json")
    rows = {row["name"]: row for row in json.loads(r.output)}
    assert rows["hello"]["status"] == "completed"
    assert rows["hello"]["last_line"] == "hi there"
    assert rows["hp_0.2_32"]["status"] == "cancelled"
    r = invoke(tmp_path, "list")
    assert "NAME" in r.output
    assert "completed" in r.output
    r = invoke(tmp_path, "logs", "hp_0.1_16")
    assert r.output == "lr=0.1 bs=16\n"
    r = invoke(tmp_path, "logs", "hello", "-f")  # ended: prints and returns
    assert r.output == "hi there\n"


def test_errors_are_one_line_without_traceback(tmp_path):
    (tmp_path / "experiments.json").write_text(
        '[\n  {"name": "a", "command": "x", "timeout": "soon"}\n]\n'
    )
    for args in (["list"], ["run"], ["add", "b", "--", "true"], ["sync"]):
        r = invoke(tmp_path, *args)
        assert r.exit_code == 1, args
        assert (
            "Error: experiments.json line 2: entry 0 ('a'): field 'timeout' is invalid" in r.output
        )
        assert "Traceback" not in r.output
    r = invoke(tmp_path, "grid", "echo {x}", "--param", "x")
    assert r.exit_code == 1
    assert "NAME=V1,V2" in r.output
    (tmp_path / "experiments.json").write_text("[]")
    r = invoke(tmp_path, "cancel", "nope")
    assert "no experiment named 'nope'" in r.output


def test_run_exit_status_reflects_failures(tmp_path):
    invoke(tmp_path, "add", "bad", "--", "exit 4")
    r = invoke(tmp_path, "run")
    assert r.exit_code == 1
    assert "failed" in r.output
