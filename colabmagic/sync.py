"""Project sync: mirror a local directory into the remote kernel's host, changed files only.

::

    from colabmagic import sync
    s = colabmagic.connect("gpu-box")
    sync.sync(s, "~/proj", "proj", autoreload=True)   # up: edits, new files, renames, deletes
    sync.sync(s, "~/proj", "proj", down=True)         # down: the host's outputs come back

**What is compared.** The local side lists the project (``git ls-files --cached --others
--exclude-standard`` in a git work tree, so ``.gitignore``, ``.git/info/exclude`` and the global
excludes apply exactly as git applies them; elsewhere ``.gitignore`` files through ``pathspec``),
drops ``--exclude`` patterns (gitignore syntax) and ``.git``/``__pycache__``/``*.pyc``, and sends
one request carrying ``(path, size, mtime_ns)`` for every file. The kernel answers with what
differs: files whose size or mtime moved since the last sync, hashed (sha256) only when the sizes
agree. A sync where nothing changed is that one request and its answer, with no file data.

**What is owned.** ``REMOTE_DIR/.colabmagic-sync.json`` records each file a sync wrote (see
:mod:`colabmagic.remote.sync_kernel`). Only those are deleted when they disappear locally, and only
if nobody changed them on the host since; files the user made on the host are never deleted. A
rename is a delete plus a new file with the same hash: the host moves the file, nothing is sent.

**How data moves.** Through the session's own paths: up to 512 KiB of changed files inline with
the request that applies them, more in pushed batches of up to 32 MiB (``Session.push``), and files
of 32 MiB or more one by one through ``Session.upload``/``Session.download`` (verified by sha256).
Every write is atomic (temporary name, then rename) on both sides.

**Down.** ``down=True`` lists REMOTE_DIR, applies the same ignore rules, and fetches files that are
new or changed on the host, except the ones an up-sync put there unchanged. A local file is
overwritten only when it has not changed since sync last wrote it (here or there); otherwise it is
kept and reported as a conflict. Files a previous ``down`` brought are deleted here when they are
gone there and unchanged here; the record lives in ``~/.colabmagic/sync``.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import os
import socket
import stat
import tempfile
import weakref
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from colabmagic.errors import ParameterError, TransferError
from colabmagic.ignore import IgnoreRules, ProjectFile
from colabmagic.relay import QuietRelay
from colabmagic.remote import sync_kernel as _kernel

INLINE_LIMIT = 512 * 1024
BATCH_LIMIT = 32 * 1024 * 1024
BIG_FILE = 32 * 1024 * 1024
STATE_DIR = "~/.colabmagic/sync"
MAX_FILES = 50_000

_SOURCE = Path(_kernel.__file__).read_bytes()
_MODULE = "_colabmagic_sync_" + hashlib.sha256(_SOURCE).hexdigest()[:12]
_PACKED = base64.b64encode(zlib.compress(_SOURCE, 9)).decode()
_BOOT = (
    "import sys, types, zlib, base64\n"
    "m = sys.modules.get(NAME)\n"
    "if m is None:\n"
    "    m = types.ModuleType(NAME)\n"
    "    exec(compile(zlib.decompress(base64.b64decode(SRC)), '<colabmagic sync>', 'exec'),"
    " m.__dict__)\n"
    "    sys.modules[NAME] = m\n"
    "m.main(OP, PAYLOAD)\n"
)


@dataclass
class SyncResult:
    """What one sync did. ``requests`` counts the session calls it made (each one round trip)."""

    direction: str
    local_dir: str
    remote_dir: str
    files: int = 0
    sent: list[str] = field(default_factory=list)
    renamed: list[tuple[str, str]] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    touched: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    bytes: int = 0
    requests: int = 0
    same_dir: bool = False

    @property
    def changed(self) -> bool:
        """True when a file was written, renamed or deleted."""
        return bool(self.sent or self.renamed or self.deleted)

    def summary(self) -> str:
        """One line for people, e.g. ``synced ./proj -> /srv/proj: 2 sent (1.2 kB), ...``."""
        arrow = "->" if self.direction == "up" else "<-"
        head = f"synced {self.local_dir} {arrow} {self.remote_dir}"
        if self.same_dir:
            return f"{head}: the same directory (a kernel on this machine); nothing to do"
        verb = "sent" if self.direction == "up" else "fetched"
        parts = [f"{len(self.sent)} {verb} ({_size(self.bytes)})"]
        parts += [f"{len(self.renamed)} renamed"] if self.renamed else []
        parts += [f"{len(self.deleted)} deleted"] if self.deleted else []
        unchanged = self.files - len(self.sent) - len(self.renamed)
        parts.append(f"{max(unchanged, 0)} unchanged")
        if self.kept:
            where = "on the host" if self.direction == "up" else "here"
            parts.append(f"{len(self.kept)} not deleted (changed {where}: {_few(self.kept)})")
        if self.skipped:
            parts.append(
                f"{len(self.skipped)} not overwritten (newer on the host: {_few(self.skipped)})"
            )
        if self.conflicts:
            where = "on the host" if self.direction == "up" else "here"
            parts.append(
                f"{len(self.conflicts)} kept {where} (changed on both sides: "
                f"{_few(self.conflicts)}; --force overwrites)"
            )
        return f"{head}: {', '.join(parts)}"


def _few(paths: list[str]) -> str:
    return ", ".join(paths[:3]) + (", ..." if len(paths) > 3 else "")


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"  # pragma: no cover


def _stat(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns] if stat.S_ISREG(st.st_mode) else None


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Syncer:
    """Sync one local directory with one directory on the session's host.

    Parameters
    ----------
    session
        A connected :class:`~colabmagic.session.Session`.
    local_dir
        The project here (default: the current directory).
    remote_dir
        Where it goes on the host; relative paths are relative to the kernel's working directory
        (default: the kernel's working directory itself). It is put on the kernel's ``sys.path``.
    exclude
        Extra patterns to skip, in gitignore syntax.
    gitignore
        Honour ``.gitignore`` (default True).
    autoreload
        Enable IPython's autoreload (``%autoreload 2``) in the kernel, so modules that changed are
        reloaded before the next cell runs.
    force
        Overwrite files changed on both sides (up: the host's copy; down: the local one), and
        files changed only on the host (up). Without it they are kept and reported.
    state_dir
        Where ``down`` records what it brought here (default ``~/.colabmagic/sync``).
    """

    def __init__(
        self,
        session,
        local_dir: str = ".",
        remote_dir: str | None = None,
        *,
        exclude: tuple[str, ...] | list[str] = (),
        gitignore: bool = True,
        autoreload: bool = False,
        force: bool = False,
        state_dir: str | None = None,
    ):
        local = os.path.abspath(os.path.expanduser(local_dir))
        if not os.path.isdir(local):
            what = "is not a directory" if os.path.exists(local) else "does not exist"
            msg = f"LOCAL_DIR {local} {what}; give the project directory, e.g. %colab_sync . proj"
            raise ParameterError(msg)
        if local == os.path.expanduser("~"):
            msg = f"LOCAL_DIR {local} is your home directory; give a project directory instead"
            raise ParameterError(msg)
        if remote_dir is not None and not remote_dir.strip():
            msg = "REMOTE_DIR is empty; give a directory on the host, e.g. proj or ~/proj"
            raise ParameterError(msg)
        bad = [p for p in exclude if not str(p).strip()]
        if bad:
            msg = "--exclude needs a pattern in gitignore syntax, e.g. --exclude 'data/'"
            raise ParameterError(msg)
        self.session = session
        self.local_dir = local
        self.remote_dir = remote_dir
        self.exclude = tuple(exclude)
        self.gitignore = gitignore
        self.autoreload = autoreload
        self.force = force
        self.state_dir = os.path.expanduser(state_dir or STATE_DIR)
        st = os.stat(local)
        self._local_id = {"host": socket.gethostname(), "id": [st.st_dev, st.st_ino]}
        self._requests = 0

    # -- plumbing ----------------------------------------------------------------------------
    def _call(self, op: str, payload: dict) -> dict:
        """One request to the kernel-side helper: one ``Session.run``, one round trip."""
        packed = base64.b64encode(zlib.compress(json.dumps(payload).encode(), 1)).decode()
        names = {"NAME": _MODULE, "SRC": _PACKED, "OP": op, "PAYLOAD": packed}
        code = f"exec({_BOOT!r}, {names!r})"
        self._requests += 1
        result = self.session.run(code, silent=True, store_history=False, relay=QuietRelay())
        for line in result.stdout.splitlines():
            if line.startswith(_kernel.MARKER):
                reply = json.loads(zlib.decompress(base64.b64decode(line[len(_kernel.MARKER) :])))
                break
        else:
            msg = f"the kernel gave no answer to sync's {op!r} request; is it a Python kernel?"
            raise TransferError(msg)
        if "error" in reply:
            raise TransferError(reply["error"])
        return reply

    def _rules(self) -> IgnoreRules:
        return IgnoreRules(self.local_dir, self.exclude, gitignore=self.gitignore)

    def _result(self, direction: str, root: str) -> SyncResult:
        return SyncResult(direction, self.local_dir, root)

    # -- up ----------------------------------------------------------------------------------
    def up(self) -> SyncResult:
        """Mirror the local project onto the host; returns what was done."""
        self._requests = 0
        files = self._rules().files()
        if len(files) > MAX_FILES:
            msg = (
                f"LOCAL_DIR {self.local_dir} has {len(files)} files after .gitignore and --exclude "
                f"(the limit is {MAX_FILES}); sync a subdirectory or --exclude the bulk, e.g. data/"
            )
            raise ParameterError(msg)
        _, fetched = self._load_state()
        for rel, rec in fetched.items():  # outputs --down brought here, unchanged: not ours to send
            if rel in files and [files[rel].size, files[rel].mtime_ns] == rec["l"]:
                del files[rel]
        rep = self._call(
            "plan",
            {
                "dir": self.remote_dir or "",
                "local": self._local_id,
                "autoreload": self.autoreload,
                "files": [[rel, f.size, f.mtime_ns] for rel, f in files.items()],
            },
        )
        res = self._result("up", rep["root"])
        res.files = len(files)
        if rep["same"]:
            res.same_dir, res.requests = True, self._requests
            return res
        gone = {rel: tuple(v) for rel, v in rep["gone"].items()}
        gone_sizes = {size for _, size in gone.values()}
        renames, touches, writes = [], [], []
        used: set[str] = set()
        for rel, (remote_hash, who) in sorted(rep["changed"].items()):
            f = files[rel]
            if remote_hash:  # same size there: compare content
                digest = _sha256(f.path)
                if digest == remote_hash:
                    touches.append([rel, [f.size, f.mtime_ns], digest])
                    continue
            if who == "host" and not self.force:
                res.skipped.append(rel)  # only the host's copy changed: it is newer
                continue
            if who == "both" and not self.force:
                res.conflicts.append(rel)
                continue
            if remote_hash is None and f.size in gone_sizes:  # a rename: same content vanished
                digest = _sha256(f.path)
                src = next((g for g, (h, _) in gone.items() if h == digest and g not in used), None)
                if src is not None:
                    used.add(src)
                    renames.append([src, rel, [f.size, f.mtime_ns]])
                    continue
            writes.append(rel)
        res.touched = [t[0] for t in touches]
        res.renamed = [(r[0], r[1]) for r in renames]
        # Gone from the listing but still here (newly excluded or ignored): not a delete.
        deletes = sorted(
            g
            for g in gone
            if g not in used and not os.path.lexists(os.path.join(self.local_dir, *g.split("/")))
        )
        res.kept = list(rep["kept"])
        final = {"root": res.remote_dir, "renames": renames, "deletes": deletes, "touches": touches}
        final["writes"], final["inline"] = [], {}
        small = [r for r in writes if files[r].size < BIG_FILE]
        if sum(files[r].size for r in small) <= INLINE_LIMIT:
            for rel in small:
                data, entry = self._read(files[rel], rel)
                final["inline"][rel] = base64.b64encode(data).decode()
                final["writes"].append(entry)
                res.bytes += len(data)
        else:
            self._push_batches(small, files, res)
        for rel in writes:
            if files[rel].size >= BIG_FILE:
                final["writes"].append(self._upload_big(files[rel], rel, res))
        res.sent = sorted(writes)
        if writes or renames or deletes or touches:
            done = self._call("apply", final)
            res.deleted, res.kept = done["deleted"], sorted(res.kept + done["kept"])
        res.requests = self._requests
        return res

    def _read(self, f: ProjectFile, rel: str) -> tuple[bytes, list]:
        with open(f.path, "rb") as fh:
            data = fh.read()
            st = os.fstat(fh.fileno())
        entry = [rel, [st.st_size, st.st_mtime_ns], hashlib.sha256(data).hexdigest(), f.mode]
        return data, entry

    def _push_batches(
        self, rels: list[str], files: dict[str, ProjectFile], res: SyncResult
    ) -> None:
        batch: dict[str, bytes] = {}
        entries: list = []

        def flush() -> None:
            self._requests += 1
            self.session.push({_kernel.DATA_VAR: dict(batch)})
            self._call("apply", {"root": res.remote_dir, "writes": list(entries)})
            batch.clear()
            entries.clear()

        for rel in rels:
            data, entry = self._read(files[rel], rel)
            batch[rel] = data
            entries.append(entry)
            res.bytes += len(data)
            if sum(len(b) for b in batch.values()) >= BATCH_LIMIT:
                flush()
        if batch:
            flush()

    def _upload_big(self, f: ProjectFile, rel: str, res: SyncResult) -> list:
        st = os.stat(f.path)
        digest = _sha256(f.path)
        staged = f"{res.remote_dir}/{_kernel.STAGING}/{digest}"
        self._requests += 1
        res.bytes += self.session.upload(f.path, staged)
        return [rel, [st.st_size, st.st_mtime_ns], digest, f.mode]

    # -- down --------------------------------------------------------------------------------
    def down(self) -> SyncResult:
        """Fetch files that are new or changed on the host; returns what was done."""
        self._requests = 0
        rep = self._call("listing", {"dir": self.remote_dir or "", "local": self._local_id})
        res = self._result("down", rep["root"])
        if rep["same"]:
            res.same_dir, res.requests = True, self._requests
            return res
        rules = self._rules()
        remote = {_checked(rel): [size, mtime] for rel, size, mtime in rep["files"]}
        listed = set(remote)
        skipped = rules.ignored(sorted(remote))
        remote = {rel: st for rel, st in remote.items() if rel not in skipped}
        res.files = len(remote)
        owned = rep["owned"]
        state_path, state = self._load_state()
        todo: list[tuple[str, str | None, bool, bool]] = []  # rel, local hash, big, may write
        for rel, rs in sorted(remote.items()):
            rec, mine = owned.get(rel), state.get(rel)
            if rec and rec["r"] == rs:
                continue  # an up-sync put it there and it is unchanged: not an output
            path = os.path.join(self.local_dir, *rel.split("/"))
            ls = _stat(path)
            if mine and mine["r"] == rs and ls == mine["l"]:
                continue
            if ls is None:
                if os.path.lexists(path):
                    res.conflicts.append(rel)  # a directory (or odd file) is in the way here
                else:
                    todo.append((rel, None, rs[0] >= BIG_FILE, True))
                continue
            safe = self.force or bool((mine and ls == mine["l"]) or (rec and ls == rec["l"]))
            local_hash = _sha256(path) if ls[0] == rs[0] else None
            if not safe and local_hash is None:
                res.conflicts.append(rel)
                continue
            todo.append((rel, local_hash, rs[0] >= BIG_FILE, safe))
        try:
            self._fetch(todo, remote, state, res)
        finally:
            self._delete_gone(listed, state, res)
            _save_state(state_path, state)
        res.requests = self._requests
        return res

    def _fetch(self, todo: list, remote: dict, state: dict, res: SyncResult) -> None:
        groups: list[list] = [[]]
        total = 0
        for item in todo:
            size = remote[item[0]][0]
            if groups[-1] and total + size > BATCH_LIMIT:
                groups.append([])
                total = 0
            groups[-1].append(item)
            total += 0 if item[2] else size
        info = {rel: (local_hash, safe) for rel, local_hash, _, safe in todo}
        for group in groups:
            if not group:
                continue
            req = [[rel, h, big or not safe] for rel, h, big, safe in group]
            rep = self._call(
                "fetch", {"root": res.remote_dir, "files": req, "inline_limit": INLINE_LIMIT}
            )
            data = {rel: base64.b64decode(b) for rel, b in rep["inline"].items()}
            if rep["stashed"]:
                self._requests += 1
                data.update(self.session.pull(_kernel.OUT_VAR))
                self._call("drop", {})
            for rel, got in rep["files"].items():
                if got is None:
                    continue  # gone since the listing
                digest, rs = got
                local_hash, safe = info[rel]
                path = os.path.join(self.local_dir, *rel.split("/"))
                if digest == local_hash:
                    state[rel] = {"r": rs, "l": _stat(path), "h": digest}
                    continue
                if not safe:
                    res.conflicts.append(rel)
                    continue
                try:
                    if rel in data:
                        _write_local(path, data[rel])
                    else:
                        self._download_big(rel, digest, path, res)
                except OSError:  # e.g. a file here where the host has a directory
                    res.conflicts.append(rel)
                    continue
                res.bytes += rs[0]
                res.sent.append(rel)
                state[rel] = {"r": rs, "l": _stat(path), "h": digest}
        res.conflicts.sort()

    def _download_big(self, rel: str, digest: str, path: str, res: SyncResult) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".colabmagic-sync-", dir=os.path.dirname(path))
        os.close(fd)
        try:
            self._requests += 1
            self.session.download(f"{res.remote_dir}/{rel}", tmp)
            if _sha256(tmp) != digest:
                msg = f"{rel} changed on the host while it was fetched; sync again"
                raise TransferError(msg)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(OSError):
                os.remove(tmp)

    def _delete_gone(self, listed: set[str], state: dict, res: SyncResult) -> None:
        """Delete here what ``down`` brought and the host no longer has (if unchanged here)."""
        for rel in sorted(set(state) - listed):
            rec = state.pop(rel)
            path = os.path.join(self.local_dir, *rel.split("/"))
            ls = _stat(path)
            if ls is not None and ls == rec["l"]:
                os.remove(path)
                res.deleted.append(rel)
                _kernel._prune(self.local_dir, os.path.dirname(path))
            elif ls is not None:
                res.kept.append(rel)

    def _load_state(self) -> tuple[str, dict]:
        """What ``down`` brought here: ``{path: {"r": host stat, "l": local stat, "h": hash}}``."""
        key = json.dumps([self.session.transport.target, self.remote_dir or "", self.local_dir])
        path = os.path.join(self.state_dir, hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")
        try:
            with open(path) as f:
                return path, json.load(f).get("files", {})
        except (OSError, ValueError):
            return path, {}


def _checked(rel: str) -> str:
    """A relative POSIX path from the host, refused if it would leave LOCAL_DIR."""
    parts = rel.split("/")
    if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        msg = f"the host listed {rel!r}, a path outside REMOTE_DIR; refusing to sync it"
        raise TransferError(msg)
    return rel


def _save_state(path: str, files: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".state-", dir=os.path.dirname(path))
    with os.fdopen(fd, "w") as f:
        json.dump({"version": 1, "files": files}, f)
    os.replace(tmp, path)


def _write_local(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".colabmagic-sync-", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


_last: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def sync(
    session,
    local_dir: str | None = None,
    remote_dir: str | None = None,
    *,
    down: bool = False,
    exclude: tuple[str, ...] | list[str] | None = None,
    gitignore: bool | None = None,
    autoreload: bool | None = None,
    force: bool = False,
) -> SyncResult:
    """Sync *local_dir* with *remote_dir* on *session*'s host (see the module docstring).

    Without directories, the arguments left out repeat the session's previous sync (so
    ``%%gpu_run --sync`` syncs what ``%colab_sync`` synced last); otherwise they default to:
    the current directory, the kernel's working directory, no extra excludes, ``.gitignore``
    honoured, no autoreload.

    Returns
    -------
    SyncResult
        What was sent, renamed, deleted, kept, and how many requests it took.

    Examples
    --------
    >>> sync(session, "proj", "proj", exclude=["data/"]).summary()  # doctest: +SKIP
    'synced /home/me/proj -> /content/proj: 3 sent (12.0 kB), 41 unchanged'
    """
    prev = _last.get(session) if local_dir is None and remote_dir is None else None
    base = dataclasses.asdict(prev) if prev is not None else {}
    spec = _Spec(
        local_dir=os.path.abspath(
            os.path.expanduser(local_dir if local_dir is not None else base.get("local_dir", "."))
        ),
        remote_dir=remote_dir if remote_dir is not None else base.get("remote_dir"),
        exclude=tuple(exclude) if exclude is not None else base.get("exclude", ()),
        gitignore=gitignore if gitignore is not None else base.get("gitignore", True),
        autoreload=autoreload if autoreload is not None else base.get("autoreload", False),
    )
    syncer = Syncer(
        session,
        spec.local_dir,
        spec.remote_dir,
        exclude=spec.exclude,
        gitignore=spec.gitignore,
        autoreload=spec.autoreload,
        force=force,
    )
    result = syncer.down() if down else syncer.up()
    _last[session] = spec
    return result


@dataclass(frozen=True)
class _Spec:
    local_dir: str
    remote_dir: str | None
    exclude: tuple[str, ...]
    gitignore: bool
    autoreload: bool
