"""The benchmark harness on a small synthetic library (the real run uses the Wesnoth music)."""

from __future__ import annotations

from click.testing import CliRunner

from colabmagic.cli import main
from colabmagic.fingerprint.bench import run_benchmark, summary_lines

from .conftest import synth_music, write_wav


def test_benchmark_harness(tmp_path):
    for i in range(8):
        write_wav(tmp_path / f"song{i}.wav", synth_music(300 + i, 13.0))
    res = run_benchmark(
        music_dir=str(tmp_path),
        workers=1,
        conditions=("clean", "snr+10", "speed1.05"),
        lengths=(10.0,),
        queries_per_track=1,
    )
    assert (res["indexed_tracks"], res["held_out_tracks"]) == (7, 1)
    for key in ("clean@10s", "snr+10@10s", "speed1.05@10s"):
        c = res["conditions"][key]
        assert c["recall"] == 1.0, key
        assert c["false_positives"] == 0, key
    assert 12.0 < res["index"]["bytes_per_hash"] <= 16.0  # 12 per hash + 8 per peak
    assert any("recall" in line for line in summary_lines(res))


def test_bench_cli_rejects_a_small_library(tmp_path):
    write_wav(tmp_path / "one.wav", synth_music(1, 3.0))
    res = CliRunner().invoke(main, ["fp", "bench", "--music-dir", str(tmp_path)])
    assert res.exit_code == 1
    assert "holds 1 audio files" in res.output
