"""``colabmagic exp ...``: thin click commands over :mod:`colabmagic.experiments`.

The only module of the package that prints. Library errors become one-line click errors.
"""

from __future__ import annotations

import json
import logging
import shlex
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click

from colabmagic.errors import ColabMagicError

F = TypeVar("F", bound=Callable[..., Any])


@contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except ColabMagicError as exc:
        raise click.ClickException(str(exc)) from None


def _project(ctx: click.Context) -> Any:
    from colabmagic.experiments.state import Project

    return Project(ctx.obj["project"])


@click.group(name="exp")
@click.option(
    "-C", "--project", "project", default=".", show_default=True,
    type=click.Path(file_okay=False), help="Directory holding experiments.json.",
)  # fmt: skip
@click.pass_context
def exp(ctx: click.Context, project: str) -> None:
    """Batch experiments: experiments.json queue, run, daemon, sync."""
    ctx.ensure_object(dict)
    ctx.obj["project"] = project


def _env_pairs(values: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            msg = f"--env {item!r} must look like KEY=VALUE"
            raise click.BadParameter(msg)
        out[key] = value
    return out


def _gpu_ids(value: str | None) -> list[str] | None:
    """``--gpu-ids 0,1`` as a list; ``None`` (not given) lets the queue detect them."""
    return None if value is None else [x for x in value.split(",") if x]


@exp.command("add")
@click.argument("name")
@click.argument("command", nargs=-1, required=True)
@click.option("--timeout", type=float, help="Seconds before the run is stopped.")
@click.option("--retries", type=click.IntRange(0, 100), default=0, show_default=True)
@click.option("--gpus", type=click.IntRange(0), default=1, show_default=True)
@click.option("--env", "env", multiple=True, help="KEY=VALUE (repeatable).")
@click.option("--cwd", help="Working directory, relative to the project.")
@click.option("--depends-on", multiple=True, help="Run after this experiment completed.")
@click.option("--tag", "tags", multiple=True)
@click.pass_context
def add_cmd(
    ctx: click.Context, name: str, command: tuple[str, ...], timeout: float | None,
    retries: int, gpus: int, env: tuple[str, ...], cwd: str | None,
    depends_on: tuple[str, ...], tags: tuple[str, ...],
) -> None:  # fmt: skip
    """Add experiment NAME running COMMAND (put it after --).

    \b
    Example:
      colabmagic exp add baseline --timeout 3600 -- python train.py --lr 0.01
    """
    from colabmagic import experiments as ex

    cmd = command[0] if len(command) == 1 else shlex.join(command)
    with _errors():
        ex.add(_project(ctx), name, cmd, timeout=timeout, retries=retries, gpus=gpus,
               env=_env_pairs(env), cwd=cwd, depends_on=depends_on, tags=tags)  # fmt: skip
    click.echo(f"added {name}: {cmd}")


def _fmt_duration(value: float | None) -> str:
    if value is None:
        return ""
    if value < 60:
        return f"{value:.1f}s"
    return f"{int(value // 60)}m{int(value % 60):02d}s"


def _fmt_metrics(metrics: dict[str, Any], limit: int = 3) -> str:
    parts = []
    for key, value in list(metrics.items())[:limit]:
        parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return "\n".join(lines)


def _print_rows(rows: list[Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in rows], indent=2))
        return
    if not rows:
        click.echo("no experiments (add some with `colabmagic exp add NAME -- COMMAND`)")
        return
    table = [
        [r.name, r.status, str(r.attempts or ""), _fmt_duration(r.duration),
         "" if r.exit_code is None else str(r.exit_code), _fmt_metrics(r.metrics),
         (r.last_line or r.message)[:60]]
        for r in rows
    ]  # fmt: skip
    header = ["NAME", "STATUS", "ATTEMPTS", "DURATION", "EXIT", "METRICS", "LAST LINE"]
    click.echo(_table(table, header))


@exp.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def list_cmd(ctx: click.Context, as_json: bool) -> None:
    """Show experiments: status, attempts, duration, exit code, metrics, last log line."""
    from colabmagic.experiments.sync import daemon_health, status_rows

    with _errors():
        project = _project(ctx)
        rows = status_rows(project)
    _print_rows(rows, as_json)
    health = daemon_health(project)
    if not as_json and health and health.get("error"):
        click.echo(f"daemon error: {health['error']}", err=True)


@exp.command("grid")
@click.argument("template")
@click.option("--param", "params", multiple=True, required=True, help="NAME=V1,V2,...")
@click.option("--name", "name", help="Name pattern, e.g. 'hparam_{lr}_{bs}'.")
@click.option("--timeout", type=float)
@click.option("--retries", type=click.IntRange(0, 100), default=0)
@click.option("--gpus", type=click.IntRange(0), default=1)
@click.option("--tag", "tags", multiple=True)
@click.pass_context
def grid_cmd(
    ctx: click.Context, template: str, params: tuple[str, ...], name: str | None,
    timeout: float | None, retries: int, gpus: int, tags: tuple[str, ...],
) -> None:  # fmt: skip
    """Add one experiment per combination of --param values.

    \b
    Example (12 experiments):
      colabmagic exp grid 'python train.py --lr {lr} --bs {bs}' \\
          --param lr=0.001,0.01,0.1 --param bs=16,32,64,128 --name 'hparam_{lr}_{bs}'
    """
    from colabmagic import experiments as ex

    with _errors():
        parsed = dict(ex.parse_param(p) for p in params)
        exps = ex.grid(_project(ctx), template, parsed, name=name, timeout=timeout,
                       retries=retries, gpus=gpus, tags=tags)  # fmt: skip
    click.echo(f"added {len(exps)} experiments: {exps[0].name} ... {exps[-1].name}")


@exp.command("cancel")
@click.argument("name")
@click.pass_context
def cancel_cmd(ctx: click.Context, name: str) -> None:
    """Cancel NAME (kills its process group if it runs here; push for the daemon to see it)."""
    from colabmagic import experiments as ex

    with _errors():
        ex.cancel(_project(ctx), name)
    click.echo(f"{name} marked cancelled; `colabmagic exp sync --push` tells a remote daemon")


@exp.command("rerun")
@click.argument("name")
@click.pass_context
def rerun_cmd(ctx: click.Context, name: str) -> None:
    """Run NAME again (bumps its rerun counter)."""
    from colabmagic import experiments as ex

    with _errors():
        count = ex.rerun(_project(ctx), name)
    click.echo(f"{name} queued again (rerun {count})")


@exp.command("run")
@click.option("--slots", type=click.IntRange(1), default=1, show_default=True)
@click.option("--backend", type=click.Choice(["local", "dask"]), default="local", show_default=True)
@click.option("--scheduler", help="Dask scheduler address, e.g. tcp://HOST:8786.")
@click.option("--gpu-ids", help="Comma-separated GPU ids to hand out (default: detected).")
@click.option("--grace", type=float, default=5.0, show_default=True,
              help="Seconds between SIGTERM and SIGKILL.")  # fmt: skip
@click.option("--retry-backoff", type=float, default=5.0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def run_cmd(
    ctx: click.Context, slots: int, backend: str, scheduler: str | None, gpu_ids: str | None,
    grace: float, retry_backoff: float, as_json: bool,
) -> None:  # fmt: skip
    """Run the pending experiments here and now, then exit (status 1 if any did not complete)."""
    from colabmagic import experiments as ex

    with _errors():
        rows = ex.run(_project(ctx), slots=slots, backend=backend, scheduler=scheduler,
                      gpu_ids=_gpu_ids(gpu_ids), grace=grace,
                      retry_backoff=retry_backoff)  # fmt: skip
    _print_rows(rows, as_json)
    if any(r.status in ("failed", "timeout", "interrupted") for r in rows):
        ctx.exit(1)


@exp.command("daemon")
@click.option("--repo", required=True, type=click.Path(file_okay=False, exists=True))
@click.option("--branch", required=True)
@click.option("--remote", default="origin", show_default=True)
@click.option("--poll", type=float, default=30.0, show_default=True, help="Seconds between fetches")
@click.option("--slots", type=click.IntRange(1), default=1, show_default=True)
@click.option("--on-stop", type=click.Choice(["wait", "kill"]), default="wait", show_default=True)
@click.option("--gpu-ids", help="Comma-separated GPU ids to hand out (default: detected).")
@click.option("--grace", type=float, default=5.0, show_default=True)
@click.option("--retry-backoff", type=float, default=5.0, show_default=True)
@click.option("--backend", type=click.Choice(["local", "dask"]), default="local", show_default=True)
@click.option("--scheduler", help="Dask scheduler address, e.g. tcp://HOST:8786.")
@click.option("--no-push", is_flag=True, help="Commit results locally only.")
@click.option("--log-file", type=click.Path(dir_okay=False), help="Log here instead of stderr.")
@click.option(
    "--outputs-dir",
    type=click.Path(file_okay=False),
    help="Runs write to DIR/NAME ($COLABMAGIC_OUTPUT_DIR), e.g. on a mounted Drive.",
)
def daemon_cmd(
    repo: str, branch: str, remote: str, poll: float, slots: int, on_stop: str,
    gpu_ids: str | None, grace: float, retry_backoff: float, backend: str,
    scheduler: str | None, no_push: bool, log_file: str | None, outputs_dir: str | None,
) -> None:  # fmt: skip
    """Watch BRANCH of the clone REPO; run pending experiments; commit and push their outputs.

    SIGTERM/SIGINT stop it cleanly: running experiments finish (--on-stop wait) or are
    stopped and marked interrupted (--on-stop kill). An interrupted run is started again with
    COLABMAGIC_RESUME=1; with --outputs-dir its files (checkpoints) outlive the runtime.
    """
    from colabmagic.experiments.backends import make_backend
    from colabmagic.experiments.daemon import Daemon

    handler: logging.Handler = (
        logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    )
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger = logging.getLogger("colabmagic.experiments")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    with _errors():
        daemon = Daemon(repo, branch, remote=remote, poll=poll, slots=slots, on_stop=on_stop,
                        gpu_ids=_gpu_ids(gpu_ids), grace=grace, retry_backoff=retry_backoff,
                        backend=make_backend(backend, scheduler), push=not no_push,
                        outputs_dir=outputs_dir)  # fmt: skip

        def stop(signum: int, frame: Any) -> None:
            logger.info("received %s", signal.Signals(signum).name)
            daemon.request_stop()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        logger.info("daemon watching %s branch %s (poll %gs, %d slots)", repo, branch, poll, slots)
        daemon.run()
        logger.info("daemon stopped")


@exp.command("sync")
@click.option("--push", is_flag=True, help="Also commit your experiments.json edits and push.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def sync_cmd(ctx: click.Context, push: bool, as_json: bool) -> None:
    """Pull the daemon's results; show statuses in experiments.json; print what changed."""
    from colabmagic.experiments.sync import sync

    with _errors():
        report = sync(_project(ctx), push=push)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    if report.pulled:
        click.echo(f"pulled {report.pulled} commit(s)")
    for name in report.reruns:
        click.echo(f"{name}: rerun requested (status set back to pending)")
    for ch in report.changes:
        detail = []
        if ch["exit_code"] is not None:
            detail.append(f"exit {ch['exit_code']}")
        if ch["duration"] is not None:
            detail.append(_fmt_duration(ch["duration"]))
        if ch["message"]:
            detail.append(ch["message"])
        extra = f" ({', '.join(detail)})" if detail else ""
        click.echo(f"{ch['name']}: {ch['old'] or 'new'} -> {ch['new']}{extra}")
    if not report.changes and not report.pulled:
        click.echo("no changes since the last sync")
    if report.pushed:
        click.echo("pushed")
    if report.daemon and report.daemon.get("error"):
        click.echo(f"daemon error: {report.daemon['error']}", err=True)


@exp.command("logs")
@click.argument("name")
@click.option("-f", "--follow", is_flag=True, help="Keep printing while the experiment runs.")
@click.option("--stderr", "which", flag_value="stderr.log", help="Show stderr.log.")
@click.option("--stdout", "which", flag_value="stdout.log", default=True, help="Show stdout.log.")
@click.pass_context
def logs_cmd(ctx: click.Context, name: str, follow: bool, which: str) -> None:
    """Print outputs/NAME/stdout.log (or --stderr); -f follows it until the run ends."""
    project = _project(ctx)
    path: Path = project.output_dir(name) / which
    if not path.exists() and not follow:
        msg = f"no log yet at {path}; is {name!r} a started experiment? (`colabmagic exp list`)"
        raise click.ClickException(msg)
    pos = 0
    while True:
        try:
            with open(path, "rb") as fh:
                fh.seek(0, 2)
                if fh.tell() < pos:  # the log was trimmed or restarted
                    pos = 0
                fh.seek(pos)
                data = fh.read()
                pos = fh.tell()
        except FileNotFoundError:
            data = b""
        if data:
            click.echo(data, nl=False)
        if not follow:
            return
        status = project.read_status(name) or {}
        if status.get("status") not in (None, "running", "pending") and not data:
            return
        time.sleep(0.5)
