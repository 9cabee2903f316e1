"""benchmarks/corpus.py on a tiny corpus (CI builds only this one; the real one is 1,000+ files)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from colabmagic.fingerprint import dedup, load_audio
from colabmagic.testing import require

from .conftest import SR, ffmpeg, synth_music, write_wav

CORPUS = Path(__file__).resolve().parents[2] / "benchmarks" / "corpus.py"


def _build(out: Path, sources: list[Path], *extra: str) -> dict:
    cmd = [sys.executable, str(CORPUS), "--out", str(out), "--workers", "2"]
    for s in sources:
        cmd += ["--source", str(s)]
    subprocess.run([*cmd, *extra], check=True, capture_output=True, text=True)
    return json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two 'packages': four distinct 32-40 s tracks, a 10 s jingle, and copies of one track."""
    require(shutil.which("ffmpeg") is not None, "ffmpeg is not installed")
    root = tmp_path_factory.mktemp("sources")
    a, b = root / "game-a-music", root / "game-b-data"
    a.mkdir()
    b.mkdir()
    for i in range(4):
        write_wav((a if i < 3 else b) / f"track{i}.wav", synth_music(500 + i, 32.0 + 2 * i))
    write_wav(b / "jingle.wav", synth_music(600, 10.0))  # under 30 s: left out
    shutil.copy(a / "track0.wav", b / "same_bytes.wav")  # exact duplicate
    ffmpeg("-i", str(a / "track1.wav"), "-c:a", "libvorbis", str(b / "reencoded.ogg"))
    return [a, b]


def test_tiny_corpus_groups_offsets_and_held_out(tmp_path, sources):
    out = tmp_path / "corpus"
    m = _build(out, sources, "--files", "9", "--seed", "3")
    assert m["distinct_tracks"] == 4  # jingle too short; both copies dropped as duplicates
    dropped = {Path(f).name for fs in m["dropped_duplicates"].values() for f in fs}
    assert dropped == {"same_bytes.wav", "reencoded.ogg"}
    assert m["held_out_tracks"] == 1
    assert m["indexed_tracks"] == 3
    assert m["library_files"] == 9
    library = sorted((out / "library").iterdir())
    assert len(library) == 9
    assert len(list((out / "heldout").iterdir())) == 1
    kinds = {f["variant"] for g in m["groups"] for f in g["files"]}
    assert {"original", "trim"} <= kinds
    assert len(kinds) >= 4
    for g in m["groups"]:
        assert g["files"][0]["variant"] == "original"
        for f in g["files"]:  # every file decodes to (about) the recording minus its trim
            y = load_audio(out / f["path"])
            assert abs(len(y) / 8000 - (g["duration"] - f["offset_s"])) < 0.2
    # the manifest's groups and offsets are what the tool finds
    res = dedup([out / "library"], workers=1, backend="numpy")
    truth = {}
    for g in m["groups"]:
        for f in g["files"]:
            truth[str(out / f["path"])] = (g["group"], f["offset_s"])
    found = [sorted(truth[f][0] for f in group) for group in res.groups]
    assert sorted(found) == sorted([g["group"]] * len(g["files"]) for g in m["groups"])
    for ev in (e for evs in res.evidence for e in evs):
        expected = truth[ev.b][1] - truth[ev.a][1]
        assert abs(ev.offset_s - expected) < 0.05, (ev, expected)


def test_same_seed_same_corpus_and_an_interrupted_build_resumes(tmp_path, sources):
    out = tmp_path / "corpus"
    first = _build(out, sources, "--files", "5", "--seed", "1", "--max-seconds", "33")
    assert max(g["duration"] for g in first["groups"]) == 33.0  # the first 33 s of each track
    longest = max(first["groups"], key=lambda g: g["duration"])
    y = load_audio(out / longest["files"][0]["path"])
    assert abs(len(y) / 8000 - 33.0) < 0.1
    victim = out / first["groups"][0]["files"][-1]["path"]
    victim.unlink()  # as if the build had been interrupted there
    kept = out / first["groups"][1]["files"][0]["path"]
    mtime = kept.stat().st_mtime_ns
    again = _build(out, sources, "--files", "5", "--seed", "1", "--max-seconds", "33")
    assert again == first
    assert victim.exists()
    assert kept.stat().st_mtime_ns == mtime  # not re-encoded
    other = _build(
        tmp_path / "other", sources, "--files", "5", "--seed", "2", "--max-seconds", "33"
    )
    assert other["groups"] != first["groups"] or other["heldout"] != first["heldout"]


def test_too_few_files_is_one_clear_line(tmp_path, sources):
    cmd = [sys.executable, str(CORPUS), "--out", str(tmp_path / "c"), "--files", "1"]
    cmd += [arg for s in sources for arg in ("--source", str(s))]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert proc.returncode != 0
    assert "--files 1 is below the 3 indexed tracks" in proc.stderr.strip().splitlines()[-1]


def test_derived_recordings_past_the_base_are_distinct_and_prefix_stable(tmp_path, sources):
    """--files past the base: resampled / pitch-shifted 30-90 s segments, each a recording of
    its own with duplicates; the tool links exactly the manifest's groups."""
    out = tmp_path / "corpus"
    base = _build(out, sources, "--files", "9", "--base-files", "9", "--seed", "3")
    big = _build(out, sources, "--files", "21", "--base-files", "9", "--seed", "3")
    assert big["groups"][: len(base["groups"])] == base["groups"]  # a prefix: nothing rebuilt
    assert big["library_files"] == 21
    derived = [g for g in big["groups"] if g["package"] == "derived"]
    assert len(derived) == 3
    assert sum(len(g["files"]) for g in derived) == 12
    assert {g["derived"]["kind"] for g in derived} <= {"resample", "pitch"}
    for g in derived:
        f = g["derived"]["factor"]
        assert 0.70 <= f <= 0.88 or 1.15 <= f <= 1.40 or g["derived"]["kind"] == "pitch"
        y = load_audio(out / g["files"][0]["path"])
        assert abs(len(y) / 8000 - g["duration"]) < 0.3
        assert 30 <= g["duration"] <= 90
    files = [out / f["path"] for g in big["groups"] for f in g["files"]]
    assert len(files) == 21
    truth = {str(out / f["path"]): g["group"] for g in big["groups"] for f in g["files"]}
    res = dedup(files, workers=1, backend="numpy")
    found = sorted(sorted(truth[f] for f in group) for group in res.groups)
    assert found == sorted([g["group"]] * len(g["files"]) for g in big["groups"])


def test_derived_format_flac_is_8k_mono_and_links_exactly_the_groups(tmp_path, sources):
    """--derived-format flac: the derived recordings at the fingerprinter's 8 kHz mono (cheap to
    build and decode), duplicates in other cheap forms; still one group per recording."""
    import soundfile

    out = tmp_path / "corpus"
    m = _build(
        out, sources, "--files", "21", "--base-files", "9", "--seed", "3",
        "--derived-format", "flac",
    )  # fmt: skip
    assert m["derived_format"] == "flac"
    derived = [g for g in m["groups"] if g["package"] == "derived"]
    assert sum(len(g["files"]) for g in derived) == 12
    exts = set()
    for g in derived:
        first = out / g["files"][0]["path"]
        info = soundfile.info(first)
        assert (first.suffix, info.samplerate, info.channels) == (".flac", 8000, 1)
        assert abs(info.duration - g["duration"]) < 0.3
        for f in g["files"][1:]:
            exts.add(Path(f["path"]).suffix)
            assert f["params"]["format"] == "flac"
    assert exts <= {".flac", ".mp3", ".ogg", ".m4a", ".opus"}
    files = [out / f["path"] for g in m["groups"] for f in g["files"]]
    truth = {str(out / f["path"]): g["group"] for g in m["groups"] for f in g["files"]}
    res = dedup(files, workers=1, backend="numpy")
    found = sorted(sorted(truth[f] for f in group) for group in res.groups)
    assert found == sorted([g["group"]] * len(g["files"]) for g in m["groups"])

    bad = subprocess.run(
        [sys.executable, str(CORPUS), "--out", str(tmp_path / "x"), "--derived-format", "wav"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode == 2
    assert "--derived-format: invalid choice: 'wav'" in bad.stderr


def _corpus_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("fp_corpus", CORPUS)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["fp_corpus"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("workers", [1, 2])
def test_relations_name_shared_music_with_its_offset_and_nothing_else(tmp_path, workers):
    """Music that source dedup left in two recordings (a shared passage, one piece in two
    packages) is recorded in the manifest with its offset; unrelated music is not. Two worker
    processes find exactly what one finds."""
    corpus = _corpus_module()
    a, c, d = synth_music(700, 30.0), synth_music(701, 30.0), synth_music(702, 30.0)
    (tmp_path / "library").mkdir()
    (tmp_path / "heldout").mkdir()
    files = {
        "library/a.wav": a,
        "library/b.wav": np.concatenate([a[4 * SR : 16 * SR], c[: 18 * SR]]),  # a's 4-16 s
        "library/d.wav": d,
        "heldout/h.wav": 0.5 * a[: 28 * SR],  # the same piece, quieter, shorter
    }
    for rel, y in files.items():
        write_wav(tmp_path / rel, y)
    manifest = {
        "distinct_tracks": 4,
        "groups": [
            {"group": g, "package": "p", "files": [{"path": p, "offset_s": 0.0}]}
            for g, p in enumerate(["library/a.wav", "library/b.wav", "library/d.wav"])
        ],
        "heldout": [{"path": "heldout/h.wav"}],
    }
    m = corpus.relate(tmp_path, manifest, workers=workers)
    assert len(m["related"]) == 1
    r = m["related"][0]
    assert sorted(r["groups"]) == [0, 1]
    assert r["kind"] == "shared passage"
    start_of_1_in_0 = r["offset_s"] if r["groups"] == [0, 1] else -r["offset_s"]
    assert abs(start_of_1_in_0 - 4.0) < 0.05
    assert r["spectral_r"] > r["spectral_null"] + 0.2  # the independent check agrees
    h0, h1 = sorted(m["heldout"][0]["related"], key=lambda r: r["group"])
    assert (h0["group"], h0["kind"]) == (0, "same recording")
    assert abs(h0["offset_s"]) < 0.05
    assert (h1["group"], h1["kind"]) == (1, "shared passage")  # b holds a's 4-16 s
    assert abs(h1["offset_s"] + 4.0) < 0.05  # h starts 4 s before b
    assert h1["shared_s"] == pytest.approx(12.0, abs=1.0)
    assert m["distinct_tracks"] == 3  # the held-out track is group 0's recording
    again = corpus.relate(tmp_path, m, workers=1)  # idempotent on a related manifest
    assert again["distinct_tracks"] == 3
    assert again["related"] == m["related"]


def test_derived_recordings_of_a_looping_source_are_related(tmp_path):
    """Two segments of one looping source under one transform hold the same bars: relate()
    records that pair (dedup links them, rightly) with its offset, and any other pair of that
    source and transform that shares music; a recording alone under its transform is not
    checked; distinct_tracks still counts the sources."""
    corpus = _corpus_module()
    loop, other, x, y = (synth_music(s, 16.0) for s in (710, 711, 712, 713))
    (tmp_path / "derived").mkdir()
    (tmp_path / "library").mkdir()
    files = {
        "library/base.wav": synth_music(714, 30.0),
        "derived/a.wav": np.concatenate([x, loop]),  # the loop at 16 s
        "derived/b.wav": np.concatenate([loop[: 12 * SR], y]),  # its first 12 s at 0 s
        "derived/c.wav": np.concatenate([other, y[: 8 * SR]]),  # 8 s of b's tail
        "derived/d.wav": np.concatenate([loop, x]),  # the loop, but another transform
    }
    for rel, sig in files.items():
        write_wav(tmp_path / rel, sig)

    def derived(g, path, kind, factor):
        return {"group": g, "package": "derived", "source": "/music/loop.ogg",
                "derived": {"kind": kind, "factor": factor, "start_s": 40.0 * g},
                "files": [{"path": path, "offset_s": 0.0}]}  # fmt: skip

    manifest = {
        "distinct_tracks": 1,
        "groups": [
            {"group": 0, "package": "p", "files": [{"path": "library/base.wav", "offset_s": 0}]},
            derived(1, "derived/a.wav", "resample", 0.8),
            derived(2, "derived/b.wav", "resample", 0.8),
            derived(3, "derived/c.wav", "resample", 0.8),
            derived(4, "derived/d.wav", "pitch", 1.189),
        ],
        "heldout": [],
    }
    m = corpus.relate(tmp_path, manifest, workers=1)
    pairs = {tuple(sorted(r["groups"])): r for r in m["related"]}
    assert set(pairs) == {(1, 2), (2, 3)}  # d is alone under its transform: not checked
    assert pairs[(2, 3)]["shared_s"] == pytest.approx(8.0, abs=1.5)
    r = pairs[(1, 2)]
    start_of_2_in_1 = r["offset_s"] if r["groups"] == [1, 2] else -r["offset_s"]
    assert abs(start_of_2_in_1 - 16.0) < 0.05
    assert r["shared_s"] == pytest.approx(12.0, abs=1.5)
    assert m["distinct_tracks"] == 1


def test_scale_benchmark_scores_dedup_against_the_relations(tmp_path):
    """fingerprint_scale's dedup scoring: one recording in two groups gives true pairs (offsets
    in one time base), a shared passage counts neither way, anything else is a false pair."""
    import importlib.util

    path = CORPUS.with_name("fingerprint_scale.py")
    spec = importlib.util.spec_from_file_location("fp_scale_bench", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules["fp_scale_bench"] = bench
    spec.loader.exec_module(bench)

    def group(g, *files):
        return {"group": g, "files": [{"path": p, "offset_s": o} for p, o in files]}

    manifest = {
        "groups": [
            group(0, ("a0", 0.0), ("a1", 5.0)),  # a1: a trimmed copy, starts 5 s into a0
            group(1, ("b0", 0.0)),  # the same recording as group 0, starting 2 s into it
            group(2, ("c0", 0.0)),  # shares a passage with group 0
            group(3, ("d0", 0.0)),
        ],
        "related": [
            {"groups": [0, 1], "kind": "same recording", "offset_s": 2.0},
            {"groups": [0, 2], "kind": "shared passage", "offset_s": 0.0},
        ],
        "heldout": [{"path": "h0", "related": [{"group": 3, "offset_s": 0.0}]}],
    }
    f = {p: str(tmp_path / p) for p in ("a0", "a1", "b0", "c0", "d0")}
    ev = [
        {"a": f["a0"], "b": f["a1"], "offset_s": 5.0},
        {"a": f["a0"], "b": f["b0"], "offset_s": 2.0},  # b0 starts 2 s into a0
        {"a": f["b0"], "b": f["a1"], "offset_s": 3.0},
        {"a": f["a0"], "b": f["c0"], "offset_s": 0.0},
    ]
    res = {"groups": [{"files": [f["a0"], f["a1"], f["b0"], f["c0"]], "evidence": ev}]}
    s = bench.score_dedup(res, manifest, tmp_path)
    assert s["pairs_true"] == 3  # a0-a1, a0-b0, a1-b0
    assert (s["pairs_found"], s["precision"], s["recall"]) == (3, 1.0, 1.0)
    # c0 with a0 and a1, and with b0: the same recording shares the same passage
    assert (s["pairs_related"], s["pairs_related_found"]) == (3, 3)
    assert (s["evidence_offsets"], s["evidence_offsets_right"]) == (3, 3)
    res["groups"][0]["files"].append(f["d0"])  # an unrelated file joined: 4 false pairs
    s = bench.score_dedup(res, manifest, tmp_path)
    assert s["precision"] == pytest.approx(3 / 7)
    also, held = bench.relations(manifest)
    assert also == {0: {1, 2}, 1: {0, 2}, 2: {0, 1}}
    assert held == {"h0": {3}}


def test_budget_benchmark_with_the_shipped_budgets_gives_the_cli_recall(tmp_path, sources):
    """fingerprint_scale.py end to end on a tiny corpus (index and queries through the CLI), then
    fingerprint_caps.py on its index and queries: with the shipped posting budgets, in-process
    recall and false positives are the CLI's, cell by cell (run after other budgets in the same
    process); a malformed --budgets is one clear line."""
    import colabmagic.fingerprint.index as im

    mm = sys.modules["colabmagic.fingerprint.match"]  # the package exports the function match
    shipped = f"{mm.QUERY_HIT_BUDGET}/{mm.SPEED_HIT_BUDGET}/{im.MAX_POSTINGS}"
    out, work = tmp_path / "corpus", tmp_path / "work"
    _build(out, sources, "--files", "9", "--seed", "3")
    scale = CORPUS.with_name("fingerprint_scale.py")
    cmd = [sys.executable, str(scale), "--corpus", str(out), "--workdir", str(work)]
    cmd += ["--queries", "24", "--heldout-queries", "12", "--steps", "index,queries"]
    cmd += ["--decode-once", "--json", str(tmp_path / "scale.json")]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    run = json.loads((tmp_path / "scale.json").read_text())
    caps_py = CORPUS.with_name("fingerprint_caps.py")
    cmd = [sys.executable, str(caps_py), "--corpus", str(out), "--workdir", str(work)]
    cmd += ["--json", str(tmp_path / "scale.json"), "--budgets", "300/300/8", shipped]
    cmd += ["--conditions", "clean,snr0,speed0.95", "--out", str(tmp_path / "caps.json")]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    caps = json.loads((tmp_path / "caps.json").read_text())
    for cell, c in caps[shipped].items():
        cli = run["queries"]["cells"][cell]
        assert (c["recall"], c["false_positives"]) == (cli["recall"], cli["false_positives"])
        probe = 6 * min(mm.PROBE_HIT_BUDGET, mm.SPEED_HIT_BUDGET // 6)
        assert c["hits_median"] <= mm.QUERY_HIT_BUDGET + mm.SPEED_HIT_BUDGET + probe
    for c in caps["300/300/8"].values():
        assert c["hits_median"] <= 900  # both stages and the speed probe at most
    assert set(caps[shipped]) == {f"{c}@{s}s" for c in ("clean", "snr0", "speed0.95")
                                  for s in (5, 10)}  # fmt: skip
    assert 0.0 <= caps["hash_shares"]["over_8"] <= 1.0
    bad = [sys.executable, str(caps_py), "--corpus", str(out), "--workdir", str(work)]
    bad += ["--json", str(tmp_path / "scale.json"), "--budgets", "100/0/256"]
    bad = subprocess.run(bad, capture_output=True, text=True, check=False)
    assert bad.returncode != 0
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("--budgets '100/0/256': give QUERY_HIT_BUDGET/SPEED_HIT_BUDGET")
