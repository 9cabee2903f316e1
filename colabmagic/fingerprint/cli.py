"""`colabmagic fp ...` commands: each parses its options and calls one library function."""

from __future__ import annotations

import functools
import json
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from colabmagic.errors import ColabMagicError

BACKEND = click.Choice(["auto", "numpy", "cupy"])


def _errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Library errors become one-line click errors; undecodable files become stderr warnings."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with _warnings_to_stderr():
                return func(*args, **kwargs)
        except ColabMagicError as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper


@contextmanager
def _warnings_to_stderr() -> Iterator[None]:
    from colabmagic.fingerprint.audio import AudioDecodeWarning

    def show(message: Any, category: type, *_args: Any, **_kwargs: Any) -> None:
        click.echo(f"warning: {message}", err=True)

    with warnings.catch_warnings():
        warnings.simplefilter("always", AudioDecodeWarning)
        old, warnings.showwarning = warnings.showwarning, show
        try:
            yield
        finally:
            warnings.showwarning = old


def _read_list(path: str) -> list[tuple[str, str]]:
    """Lines ``<track_id>\\t<path>`` or ``<path>``; blank lines and ``#`` comments are skipped."""
    items = []
    for line in Path(path).read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        track_id, sep, file = line.partition("\t")
        items.append((track_id, file) if sep else (line.strip(), line.strip()))
    return items


@click.group(name="fp")
def fp() -> None:
    """Audio fingerprinting: index, query, de-duplicate."""


@fp.command(name="index")
@click.option("--db", required=True, type=click.Path(file_okay=False), help="Index directory.")
@click.argument("paths", nargs=-1, type=click.Path(exists=True))
@click.option(
    "--list",
    "list_file",
    type=click.Path(exists=True, dir_okay=False),
    help="File of lines '<track_id>\\t<path>' (id = path when absent).",
)
@click.option("--workers", type=int, default=None, help="Decode+extract processes [all CPUs].")
@click.option("--backend", type=BACKEND, default="auto", show_default=True)
@click.option("--scheduler", default=None, help="Dask scheduler address: run on that cluster.")
@click.option(
    "--commit-every",
    type=float,
    default=30.0,
    show_default=True,
    help="Save finished files to the index at least this often (seconds).",
)
@click.option("--json", "as_json", is_flag=True, help="Last stdout line: one JSON summary.")
@_errors
def index_cmd(
    db: str,
    paths: tuple[str, ...],
    list_file: str | None,
    workers: int | None,
    backend: str,
    scheduler: str | None,
    commit_every: float,
    as_json: bool,
) -> None:
    """Fingerprint PATHS (files or directories, recursive) into the index DB.

    Ctrl-C keeps every file that finished; rerun the same command to index the rest.
    """
    from colabmagic.fingerprint.index import Index, IndexInterrupted
    from colabmagic.fingerprint.pipeline import default_workers

    items: list[Any] = list(paths)
    if list_file:
        items += _read_list(list_file)
    if not items:
        msg = "no audio files to index: give PATH arguments or --list FILE."
        raise click.UsageError(msg)
    # no tqdm monitor thread: with a second thread alive the worker pool would be started with
    # "spawn" (every worker importing NumPy/SciPy again, seconds of CPU) instead of "fork"
    from tqdm import tqdm

    tqdm.monitor_interval = 0
    idx = Index(db)
    try:
        summary = idx.add(
            items,
            workers=workers or default_workers(),
            backend=backend,
            scheduler=scheduler,
            progress=True,
            commit_seconds=commit_every,
        )
    except IndexInterrupted as exc:
        s = exc.summary
        click.echo(
            f"interrupted: {s.added} files added and saved ({s.known} were already indexed); "
            f"{db} is a valid index. Rerun the same command to index the rest.",
            err=True,
        )
        sys.exit(130)
    except KeyboardInterrupt:  # a second Ctrl-C while the first one's files were being saved
        click.echo(
            f"interrupted: {db} is a valid index with what was saved; rerun the same command.",
            err=True,
        )
        sys.exit(130)
    out = {
        **summary.to_dict(),
        "tracks": len(idx),
        "index_n_hashes": idx.n_hashes,
        "memory_bytes": idx.memory_bytes,
    }
    if as_json:
        click.echo(json.dumps(out))
        return
    click.echo(
        f"{summary.added} files added ({summary.known} already indexed, {summary.skipped} "
        f"skipped), {out['hours']:.2f} h of audio, {summary.n_hashes} hashes in "
        f"{summary.elapsed_s:.1f} s ({summary.x_realtime:.0f}x realtime); index: {len(idx)} "
        f"tracks, {idx.memory_bytes / 1e6:.1f} MB"
    )


@fp.command(name="query")
@click.option("--db", required=True, type=click.Path(exists=True, file_okay=False))
@click.argument("files", nargs=-1, type=click.Path())
@click.option(
    "--list",
    "list_file",
    type=click.Path(exists=True, dir_okay=False),
    help="File of query paths (one per line; '<id>\\t<path>' also accepted).",
)
@click.option("--top", "top_k", type=int, default=1, show_default=True)
@click.option("--min-score", type=float, default=None, help="Decision threshold [tool default].")
@click.option("--backend", type=BACKEND, default="numpy", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON line per query on stdout.")
@click.option("--jsonl", "jsonl", type=click.Path(dir_okay=False), help="Write JSON lines here.")
@_errors
def query_cmd(
    db: str,
    files: tuple[str, ...],
    list_file: str | None,
    top_k: int,
    min_score: float | None,
    backend: str,
    as_json: bool,
    jsonl: str | None,
) -> None:
    """Identify each query FILE against the index DB."""
    from colabmagic.fingerprint.audio import AudioDecodeError
    from colabmagic.fingerprint.index import Index
    from colabmagic.fingerprint.match import DEFAULT_MIN_SCORE, query_file

    queries = list(files) + [p for _, p in _read_list(list_file)] if list_file else list(files)
    if not queries:
        msg = "give query FILEs or --list FILE."
        raise click.UsageError(msg)
    idx = Index(db, readonly=True)
    sink = open(jsonl, "w") if jsonl else None
    try:
        for q in queries:
            try:
                res = query_file(
                    idx,
                    q,
                    top_k=top_k,
                    backend=backend,
                    min_score=DEFAULT_MIN_SCORE if min_score is None else min_score,
                )
                line = res.to_dict()
            except AudioDecodeError as exc:
                click.echo(f"warning: {exc}", err=True)
                line = {
                    "query": q,
                    "track": None,
                    "score": 0.0,
                    "offset_s": None,
                    "latency_s": 0.0,
                    "cpu_s": 0.0,
                    "error": str(exc),
                }
            if sink is not None:
                sink.write(json.dumps(line) + "\n")
            elif as_json:
                click.echo(json.dumps(line))
            else:
                found = (
                    f"{line['track']}  score {line['score']:.1f}  at {line['offset_s']:.2f} s"
                    if line["track"] is not None
                    else "no match"
                )
                click.echo(f"{q}: {found}  ({1000 * line['latency_s']:.0f} ms)")
    finally:
        if sink is not None:
            sink.close()


@fp.command(name="dedup")
@click.argument("paths", nargs=-1, type=click.Path(exists=True))
@click.option(
    "--list",
    "list_file",
    type=click.Path(exists=True, dir_okay=False),
    help="File of paths, one a line (for more files than a command line holds).",
)
@click.option("--workers", type=int, default=None, help="Decode+extract processes [all CPUs].")
@click.option("--backend", type=BACKEND, default="auto", show_default=True)
@click.option("--scheduler", default=None, help="Dask scheduler address: decode on that cluster.")
@click.option(
    "--work-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Where the temporary index goes (~15 bytes per hash) [system temp dir].",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
@_errors
def dedup_cmd(
    paths: tuple[str, ...],
    list_file: str | None,
    workers: int | None,
    backend: str,
    scheduler: str | None,
    work_dir: str | None,
    as_json: bool,
) -> None:
    """Group the files under PATHS that hold the same recording (bounded memory)."""
    from colabmagic.fingerprint.dedup import dedup
    from colabmagic.fingerprint.pipeline import default_workers

    items: list[str] = list(paths)
    if list_file:
        items += [f for _, f in _read_list(list_file)]
    if not items:
        msg = "no audio files to compare: give PATH arguments or --list FILE."
        raise click.UsageError(msg)
    res = dedup(
        items,
        workers=workers or default_workers(),
        backend=backend,
        scheduler=scheduler,
        work_dir=work_dir,
        progress=not as_json,
    )
    if as_json:
        click.echo(json.dumps(res.to_dict()))
        return
    for n, (group, evidence) in enumerate(zip(res.groups, res.evidence, strict=True), 1):
        click.echo(f"group {n}: {len(group)} files")
        for e in evidence:
            click.echo(f"  {e.b}  =  {e.a} @ {e.offset_s:+.2f} s  (score {e.aligned})")
    click.echo(
        f"{res.files} files, {len(res.groups)} groups of duplicates, "
        f"{len(res.skipped_files)} skipped, {res.elapsed_s:.1f} s"
    )


@fp.command(name="info")
@click.option("--db", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True)
@_errors
def info_cmd(db: str, as_json: bool) -> None:
    """Describe the index DB."""
    from colabmagic.fingerprint.index import Index

    info = Index(db, readonly=True).info()
    if as_json:
        click.echo(json.dumps(info))
        return
    for k, v in info.items():
        if k != "params":
            click.echo(f"{k:15s} {v}")


@fp.command(name="remove")
@click.option("--db", required=True, type=click.Path(exists=True, file_okay=False))
@click.argument("track_ids", nargs=-1, required=True)
@click.option("--compact", is_flag=True, help="Also drop their hashes from disk now.")
@_errors
def remove_cmd(db: str, track_ids: tuple[str, ...], compact: bool) -> None:
    """Remove tracks from the index DB by id."""
    from colabmagic.fingerprint.index import Index

    idx = Index(db)
    for t in track_ids:
        if not idx.remove(t):
            click.echo(f"warning: no track {t!r} in {db}", err=True)
    if compact:
        idx.compact()


@fp.command(name="bench")
@click.option("--music-dir", default=None, help="Audio directory [Debian's wesnoth-1.16-music].")
@click.option("--workers", type=int, default=2, show_default=True)
@click.option("--backend", type=BACKEND, default="numpy", show_default=True)
@click.option("--queries-per-track", type=int, default=2, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Last stdout line: the figures as JSON.")
@_errors
def bench_cmd(
    music_dir: str | None, workers: int, backend: str, queries_per_track: int, as_json: bool
) -> None:
    """Benchmark indexing, recall under degradations, false positives and latency."""
    from colabmagic.fingerprint.bench import WESNOTH_MUSIC, run_benchmark, summary_lines

    res = run_benchmark(
        music_dir=music_dir or WESNOTH_MUSIC,
        workers=workers,
        backend=backend,
        queries_per_track=queries_per_track,
        log=lambda s: click.echo(s, err=True),
    )
    for line in summary_lines(res):
        click.echo(line)
    if as_json:
        sys.stdout.write(json.dumps(res) + "\n")
