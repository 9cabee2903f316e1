"""`colabmagic fp ...` through click's CliRunner: options and JSON shapes of the issue."""

from __future__ import annotations

import json

from click.testing import CliRunner

from colabmagic.cli import main

from .conftest import SR, write_wav


def _run(*args: str) -> str:
    res = CliRunner().invoke(main, ["fp", *args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.stdout


def test_index_query_info_roundtrip(tmp_path, library, tracks):
    db = str(tmp_path / "db")
    listing = tmp_path / "list.tsv"
    listing.write_text(
        "# id<TAB>path\n" + "".join(f"song-{i}\t{library / f't{i}.wav'}\n" for i in range(3))
    )
    out = _run("index", "--db", db, "--list", str(listing), "--workers", "1", "--json")
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["files"] == 3
    assert summary["added"] == 3
    assert summary["skipped"] == 0
    assert {"hours", "n_hashes", "seconds", "x_realtime", "memory_bytes"} <= set(summary)
    out = _run("index", "--db", db, str(library / "t3.wav"), str(library / "t0.wav"), "--json")
    again = json.loads(out.strip().splitlines()[-1])
    assert (again["added"], again["known"], again["tracks"]) == (1, 1, 4)

    write_wav(tmp_path / "q1.wav", tracks["t1"][4 * SR : 9 * SR])
    write_wav(tmp_path / "q2.wav", tracks["n0"][4 * SR : 9 * SR])
    (tmp_path / "bad.wav").write_bytes(b"RIFF....")
    lines = (
        _run(
            "query",
            "--db",
            db,
            str(tmp_path / "q1.wav"),
            str(tmp_path / "q2.wav"),
            str(tmp_path / "bad.wav"),
            "--json",
        )
        .strip()
        .splitlines()
    )
    r1, r2, r3 = map(json.loads, lines)
    assert r1["query"].endswith("q1.wav")
    assert r1["track"] == "song-1"
    assert abs(r1["offset_s"] - 4.0) < 0.05
    assert r1["score"] > 0
    assert r1["latency_s"] > 0
    assert (r2["track"], r2["offset_s"]) == (None, None)
    assert r3["track"] is None
    assert "bad.wav" in r3["error"]

    jsonl = tmp_path / "out.jsonl"
    _run("query", "--db", db, str(tmp_path / "q1.wav"), "--top", "2", "--jsonl", str(jsonl))
    (r,) = map(json.loads, jsonl.read_text().splitlines())
    assert r["track"] == "song-1"
    assert set(r) >= {"query", "track", "score", "offset_s", "latency_s"}

    info = json.loads(_run("info", "--db", db, "--json"))
    assert info["tracks"] == 4
    assert info["memory_bytes"] == 12 * info["n_hashes"] + 8 * info["n_peaks"]
    assert info["bytes_per_hash"] <= 16.0
    _run("remove", "--db", db, "song-1", "--compact")
    assert json.loads(_run("info", "--db", db, "--json"))["tracks"] == 3
    assert "no match" in _run("query", "--db", db, str(tmp_path / "q1.wav"))


def test_dedup_cli_and_errors(tmp_path, tracks):
    write_wav(tmp_path / "x.wav", tracks["t2"])
    write_wav(tmp_path / "x_cut.wav", tracks["t2"][2 * SR : 12 * SR])
    out = json.loads(_run("dedup", str(tmp_path), "--workers", "1", "--json").splitlines()[-1])
    assert [sorted(p.split("/")[-1] for p in g["files"]) for g in out["groups"]] == [
        ["x.wav", "x_cut.wav"]
    ]
    listing = tmp_path / "files.txt"  # more files than a command line holds go in a list
    listing.write_text(f"# two files\n{tmp_path / 'x.wav'}\n\n{tmp_path / 'x_cut.wav'}\n")
    listed = json.loads(
        _run("dedup", "--list", str(listing), "--workers", "1", "--json").splitlines()[-1]
    )
    assert listed["groups"] == out["groups"]
    runner = CliRunner()
    res = runner.invoke(main, ["fp", "dedup"])
    assert res.exit_code != 0
    assert "give PATH arguments or --list FILE" in res.output
    res = runner.invoke(main, ["fp", "query", "--db", str(tmp_path)])
    assert res.exit_code != 0
    assert "give query FILEs" in res.output
    res = runner.invoke(main, ["fp", "info", "--db", str(tmp_path)])
    assert res.exit_code == 1
    assert "not a fingerprint index" in res.output
