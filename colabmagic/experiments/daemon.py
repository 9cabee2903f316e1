"""The GPU-host daemon: watch one branch, run what is pending, commit and push the outputs.

The loop, all in one thread (the only one that touches git or status files):

1. every ``poll`` seconds, fetch the configured branch only and bring it in; reload
   ``experiments.json`` (a bad file is logged and recorded in ``outputs/.daemon/status.json``;
   running experiments go on, nothing new starts until it is fixed);
2. start what is runnable, commit the ``running`` statuses, push;
3. when an experiment ends, commit ``outputs/<name>/`` and push within moments; a rejected push
   fetches, rebases (or merges while experiments are writing untracked logs) and retries; an
   unreachable remote leaves the commits local until the next poll.

The daemon never writes ``experiments.json``, so its commits touch only ``outputs/`` and can
always be combined with the user's commits without a conflict.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from colabmagic.errors import ColabMagicError, ExperimentSpecError, ParameterError
from colabmagic.experiments.backends import Backend
from colabmagic.experiments.gitutil import Git, is_git_repo
from colabmagic.experiments.queue import Queue
from colabmagic.experiments.spec import parse_experiments
from colabmagic.experiments.state import (
    HOST,
    MAX_COMMIT_BYTES,
    OUTPUTS,
    Project,
    now_iso,
    write_json,
)

log = logging.getLogger("colabmagic.experiments.daemon")


def runner_lock(project: Project) -> FileLock:
    """Held by whoever runs this project's experiments (one daemon or one ``exp run``)."""
    return FileLock(str(project.lock_path("runner")), timeout=0)


@contextmanager
def hold_runner_lock(project: Project) -> Iterator[None]:
    """Hold :func:`runner_lock` for the ``with`` block.

    Raises
    ------
    ColabMagicError
        Another runner (a daemon or ``exp run``) already holds it.
    """
    lock = runner_lock(project)
    try:
        lock.acquire()
    except Timeout:
        msg = (
            f"another colabmagic runner (a daemon or `exp run`) is active in {project.root}; "
            "stop it or wait for it to finish, then retry"
        )
        raise ColabMagicError(msg) from None
    try:
        yield
    finally:
        lock.release()


class Daemon:
    """Run the experiments of one branch of one repository, forever (until stopped).

    Parameters
    ----------
    repo : path-like
        A clone of the experiments repository on the GPU host.
    branch : str
        The only branch whose commits are run.
    remote : str
        Remote to fetch from and push to.
    poll : float
        Seconds between fetches.
    slots : int
        Experiments run at once.
    on_stop : {"wait", "kill"}
        On :meth:`request_stop` (SIGTERM): let running experiments finish, or stop them
        (status ``interrupted``).
    gpu_ids, backend, grace, retry_backoff, log_limit, max_file_bytes
        Passed to :class:`~colabmagic.experiments.queue.Queue`.
    push : bool
        Push after each commit (off: commit locally only).
    """

    def __init__(
        self,
        repo: str | os.PathLike[str],
        branch: str,
        *,
        remote: str = "origin",
        poll: float = 30.0,
        slots: int = 1,
        on_stop: str = "wait",
        gpu_ids: list[str] | None = None,
        backend: Backend | None = None,
        grace: float = 5.0,
        retry_backoff: float = 5.0,
        max_file_bytes: int = MAX_COMMIT_BYTES,
        push: bool = True,
        **queue_kw: Any,
    ) -> None:
        if on_stop not in ("wait", "kill"):
            msg = f"on_stop={on_stop!r} must be 'wait' or 'kill'"
            raise ParameterError(msg)
        if poll <= 0:
            msg = f"poll={poll} must be a positive number of seconds"
            raise ParameterError(msg)
        self.project = Project(repo)
        if not is_git_repo(self.project.root):
            msg = f"{self.project.root} is not a git clone; clone the experiments repository first"
            raise ColabMagicError(msg)
        self.git = Git(self.project.root)
        self.branch = branch
        self.remote = remote
        self.poll = poll
        self.on_stop = on_stop
        self.push_enabled = push
        self.queue = Queue(
            self.project, slots=slots, gpu_ids=gpu_ids, backend=backend, grace=grace,
            retry_backoff=retry_backoff, max_file_bytes=max_file_bytes, **queue_kw,
        )  # fmt: skip
        self._stop = threading.Event()
        self._stopping = False
        self._spec_ok = False
        self._loaded_head: str | None = None
        self._spec_text: str | None = None
        self._error: str | None = None
        self._unpushed = False
        self._health: dict[str, Any] = {}

    @property
    def remote_ref(self) -> str:
        """``refs/remotes/<remote>/<branch>``."""
        return f"refs/remotes/{self.remote}/{self.branch}"

    def request_stop(self, *, kill: bool | None = None) -> None:
        """Ask :meth:`run` to return (safe from a signal handler)."""
        if kill is not None:
            self.on_stop = "kill" if kill else "wait"
        self._stop.set()
        self.queue.wake()

    # -- main loop -----------------------------------------------------------------------------
    def run(self) -> None:
        """Run until :meth:`request_stop`; returns after a clean shutdown.

        Raises
        ------
        ColabMagicError
            Another daemon (or ``exp run``) holds this repository, or the branch cannot be
            checked out.
        """
        with hold_runner_lock(self.project):
            try:
                self._prepare()
                self._loop()
            finally:
                self.queue.close()

    def _prepare(self) -> None:
        git = self.git
        git.ensure_identity()
        gitdir = Path(git.out("rev-parse", "--absolute-git-dir"))
        if (gitdir / "rebase-merge").exists() or (gitdir / "rebase-apply").exists():
            git.run("rebase", "--abort")
        if (gitdir / "MERGE_HEAD").exists():
            git.run("merge", "--abort")
        if not self._fetch():
            log.warning("remote %s unreachable at start; running the local checkout", self.remote)
        current = git.run("symbolic-ref", "--short", "-q", "HEAD").stdout.strip()
        if current != self.branch:
            if git.rev(f"refs/heads/{self.branch}"):
                git.run("checkout", "-q", self.branch, check=True)
            elif git.rev(self.remote_ref):
                git.run("checkout", "-q", "-b", self.branch, "--track",
                        f"{self.remote}/{self.branch}", check=True)  # fmt: skip
            else:
                msg = f"branch {self.branch!r} exists neither locally nor on {self.remote}"
                raise ColabMagicError(msg)
        changed = self.queue.recover()
        if changed:
            log.warning("marked interrupted after a restart: %s", ", ".join(changed))
        self._health = {"state": "running", "pid": os.getpid(), "host": HOST,
                        "branch": self.branch, "started": now_iso(), "error": None}  # fmt: skip
        self._write_health()
        self._commit([*changed, ".daemon"], f"exp daemon: start on {HOST}")
        self._integrate()
        self._load_spec()
        self._push()

    def _loop(self) -> None:
        next_poll = time.monotonic() + self.poll
        while True:
            if self._stop.is_set() and not self._stopping:
                self._stopping = True
                log.info("stopping (%s running, on_stop=%s)", len(self.queue.running), self.on_stop)
                self.queue.stop(kill=self.on_stop == "kill")
            if self._stopping and not self.queue.running:
                break
            if time.monotonic() >= next_poll:
                next_poll = time.monotonic() + self.poll
                if not self._stopping and self._fetch():
                    self._integrate()
                    self._load_spec()
                if self._unpushed:
                    self._push()
            if not self._stopping and self._spec_ok:
                changed = self.queue.schedule()
                if changed:
                    # only status.json: a just-started run is already writing its other files
                    self._commit(changed, "exp: " + self._summary(changed), status_only=True)
                    self._push()
                    self._load_spec()
            timeout = max(next_poll - time.monotonic(), 0.0)
            nxt = self.queue.next_retry()
            if nxt is not None:
                timeout = min(timeout, max(nxt - time.time(), 0.0))
            finished = self.queue.wait(timeout)
            if finished:
                self._commit(finished, "exp: " + self._summary(finished))
                self._push()
                if not self._stopping:
                    self._load_spec()
        self._health.update(state="stopped", stopped=now_iso())
        self._write_health()
        self._commit([".daemon"], f"exp daemon: stop on {HOST}")
        self._push()

    def _summary(self, names: list[str]) -> str:
        parts = []
        for name in names[:10]:
            st = self.queue.statuses.get(name) or {}
            parts.append(f"{name} {st.get('status', '?')}")
        more = f" (+{len(names) - 10} more)" if len(names) > 10 else ""
        return ", ".join(parts) + more

    # -- git -----------------------------------------------------------------------------------
    def _fetch(self) -> bool:
        res = self.git.fetch_branch(self.remote, self.branch)
        if not res.ok:
            log.warning("fetch %s/%s failed: %s", self.remote, self.branch, res.stderr.strip())
        return res.ok

    def _integrate(self) -> bool:
        """Bring in the remote branch; our commits only touch outputs/, so this cannot conflict."""
        git = self.git
        up = git.rev(self.remote_ref)
        head = git.rev("HEAD")
        if up is None or head is None or git.is_ancestor(up, head):
            return True
        if git.is_ancestor(head, up):
            res = git.run("merge", "-q", "--ff-only", up)
        elif not self.queue.running:
            res = git.run("rebase", "-q", up)
            if not res.ok:
                git.run("rebase", "--abort")
        else:
            # Running experiments write untracked logs in outputs/<name>/; a rebase would check out
            # the remote tree over them, a merge only touches the user's files.
            res = git.run("merge", "-q", "--no-edit", up)
            if not res.ok:
                git.run("merge", "--abort")
        if not res.ok:
            detail = res.stderr.strip() or res.stdout.strip()
            self._record_error(f"could not bring in {self.remote}/{self.branch}: {detail}")
        return res.ok

    def _load_spec(self) -> None:
        """Follow HEAD; re-parse ``experiments.json`` (and reload the queue) only when it changed.

        Most new HEADs are the daemon's own commits, which touch only ``outputs/``: parsing the
        file and re-reading every status file after each of them would make every finished
        experiment cost O(queue length) in I/O.
        """
        head = self.git.rev("HEAD")
        if head == self._loaded_head and self._spec_ok:
            return
        self._loaded_head = head
        self.queue.git_commit = head
        try:
            text = self.project.spec_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            text = ""
        if not self._spec_ok or text != self._spec_text:
            try:
                experiments = parse_experiments(text, source=self.project.spec_path.name)
            except ExperimentSpecError as exc:
                self._spec_ok = False
                self._record_error(str(exc))
                return
            self._spec_ok = True
            self._spec_text = text
            self.queue.load(experiments)
        if self._error is not None:
            log.info("experiments.json is valid again at %s", (head or "")[:10])
            self._error = None
            self._health.update(error=None, error_at=None, commit=head)
            self._write_health()
            self._commit([".daemon"], "exp daemon: experiments.json is valid again")
            self._push()

    def _record_error(self, message: str) -> None:
        if message == self._error:
            return
        self._error = message
        log.error("%s", message)
        self._health.update(error=message, error_at=now_iso(), commit=self.git.rev("HEAD"))
        self._write_health()
        self._commit([".daemon"], "exp daemon: error")
        self._push()

    def _write_health(self) -> None:
        self._health["updated"] = now_iso()
        self.project.daemon_status_path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.project.daemon_status_path, self._health)

    def _commit(self, names: list[str], message: str, *, status_only: bool = False) -> bool:
        """Commit ``outputs/<name>/`` for *names* (files over the size limit left out).

        With *status_only*, stage only ``status.json`` (and deletions of an earlier run's files).
        """
        git = self.git
        paths = []
        for name in names:
            out = self.project.outputs / name
            rel = f"{OUTPUTS}/{name}"
            if git.run("ls-files", "--", rel).stdout.strip():
                git.run("add", "-u", "--", rel)  # deletions of an earlier run's files
            if status_only:
                if (out / "status.json").exists():
                    paths.append(f"{rel}/status.json")
            elif out.is_dir():
                for dirpath, _, files in os.walk(out):
                    for fname in files:
                        path = Path(dirpath, fname)
                        try:
                            small = path.stat().st_size <= self.queue.max_file_bytes
                        except OSError:
                            continue
                        if small:
                            paths.append(str(path.relative_to(self.project.root)))
        for i in range(0, len(paths), 200):
            git.run("add", "-f", "--", *paths[i : i + 200])
        if git.run("diff", "--cached", "--quiet").ok:
            return False
        res = git.run("commit", "-q", "--no-verify", "-m", message)
        if not res.ok:
            log.error("commit failed: %s", res.stderr.strip() or res.stdout.strip())
            return False
        self._unpushed = True
        return True

    def _push(self) -> bool:
        if not self.push_enabled or not self._unpushed:
            return False
        for _ in range(3):
            res = self.git.run("push", "-q", self.remote, f"HEAD:refs/heads/{self.branch}")
            if res.ok:
                self._unpushed = False
                self._fetch()
                return True
            log.warning("push to %s/%s failed: %s", self.remote, self.branch, res.stderr.strip())
            if not self._fetch():
                break  # unreachable: the commits stay local until the next poll
            if not self._integrate():
                break
        return False
