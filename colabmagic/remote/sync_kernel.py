"""Kernel-side half of project sync (:mod:`colabmagic.sync`), run inside the remote kernel.

:mod:`colabmagic.sync` sends this file's source with each request (compressed, a few KiB) and
runs it once per kernel as the module ``_colabmagic_sync_<hash>``, so it needs nothing installed on
the GPU host: standard library only, Python >= 3.9. Each request calls :func:`main`, which prints
one line, ``MARKER`` + base64(zlib(JSON)), that the local side reads from the cell's stdout.

What sync owns is recorded in ``REMOTE_DIR/.colabmagic-sync.json``: for each file a sync wrote,
the local ``[size, mtime_ns]`` it came from (``l``), the remote ``[size, mtime_ns]`` right after
writing (``r``) and its sha256 (``h``). A file is unchanged when both stats still match; a file is
deleted only when sync wrote it and nobody changed it since, so files the user made on the host
are never deleted.
"""

import base64
import hashlib
import importlib
import json
import os
import socket
import stat
import sys
import tempfile
import zlib

MARKER = "\x1bCOLABMAGIC-SYNC:"
MANIFEST = ".colabmagic-sync.json"
STAGING = ".colabmagic-sync-staging"
DATA_VAR = "_colabmagic_sync_data"
OUT_VAR = "_colabmagic_sync_out"
_JUNK_DIRS = {".git", "__pycache__", ".ipynb_checkpoints", STAGING}


class SyncFailure(Exception):
    """A problem the user can fix; travels back as ``{"error": message}``."""


def _ip():
    from IPython import get_ipython

    return get_ipython()


def _encode(obj):
    return base64.b64encode(zlib.compress(json.dumps(obj).encode(), 1)).decode()


def _decode(text):
    return json.loads(zlib.decompress(base64.b64decode(text)))


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _stat(path):
    """``[size, mtime_ns]`` of a regular file, or None."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns] if stat.S_ISREG(st.st_mode) else None


def _root(directory, local_id):
    root = os.path.abspath(os.path.expanduser(directory))
    if os.path.exists(root) and not os.path.isdir(root):
        msg = f"REMOTE_DIR {root} is a file on the host; give a directory"
        raise SyncFailure(msg)
    if os.path.dirname(root) == root:
        msg = f"REMOTE_DIR {root} is the file-system root; give a project directory"
        raise SyncFailure(msg)
    same = False
    if local_id and local_id.get("host") == socket.gethostname():
        probe, first = root, True
        while True:
            try:
                st = os.stat(probe)
            except OSError:
                st = None
            if st is not None and [st.st_dev, st.st_ino] == local_id.get("id"):
                if not first:
                    msg = (
                        f"REMOTE_DIR {root} is inside LOCAL_DIR on the same machine; "
                        "give a directory outside it"
                    )
                    raise SyncFailure(msg)
                same = True
                break
            parent = os.path.dirname(probe)
            if parent == probe:
                break
            probe, first = parent, False
    return root, same


def _safe(root, rel):
    """The absolute path of *rel* under *root*; refuses escapes (``..``, absolute, symlinks)."""
    parts = rel.split("/")
    if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        msg = f"refusing the path {rel!r}: it must stay inside REMOTE_DIR"
        raise SyncFailure(msg)
    path = os.path.join(root, *parts)
    parent = os.path.realpath(os.path.dirname(path))
    real_root = os.path.realpath(root)
    if parent != real_root and not parent.startswith(real_root + os.sep):
        msg = f"refusing to write {rel!r}: a symlink on the host leads outside REMOTE_DIR"
        raise SyncFailure(msg)
    return path


_cache = {}  # manifest path -> (its stat, the parsed files): a no-change sync parses nothing


def _key(path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _load(root, cached=False):
    """The manifest's files (read-only when *cached*: the parsed copy is shared)."""
    path = os.path.join(root, MANIFEST)
    key = _key(path)
    hit = _cache.get(path)
    if cached and hit is not None and key is not None and hit[0] == key:
        return hit[1]
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    files = data.get("files", {}) if isinstance(data, dict) else {}
    if not isinstance(files, dict):
        files = {}
    files = {k: v for k, v in files.items() if _valid(v)}  # a hand-edited entry is not ours
    if cached:
        _cache[path] = (key, files)
    return files


def _valid(rec):
    return (
        isinstance(rec, dict)
        and isinstance(rec.get("l"), list)
        and isinstance(rec.get("r"), list)
        and isinstance(rec.get("h"), str)
    )


def _save(root, files):
    fd, tmp = tempfile.mkstemp(prefix=".colabmagic-sync-", dir=root)
    with os.fdopen(fd, "w") as f:
        json.dump({"version": 1, "files": files}, f)
    path = os.path.join(root, MANIFEST)
    os.replace(tmp, path)
    _cache[path] = (_key(path), files)


def _drop_bytecode(path):
    """Remove ``__pycache__/name.*.pyc`` of an edited module: its mtime may not have moved."""
    if not path.endswith(".py"):
        return
    cache = os.path.join(os.path.dirname(path), "__pycache__")
    stem = os.path.basename(path)[:-3] + "."
    try:
        names = os.listdir(cache)
    except OSError:
        return
    for name in names:
        if name.startswith(stem) and name.endswith(".pyc"):
            try:
                os.remove(os.path.join(cache, name))
            except OSError:
                pass


def _write(root, rel, data, mode):
    path = _safe(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.isdir(path) and not os.path.islink(path):
        msg = f"cannot write {rel!r}: it is a directory on the host; move it away and sync again"
        raise SyncFailure(msg)
    fd, tmp = tempfile.mkstemp(prefix=".colabmagic-sync-", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    _drop_bytecode(path)
    return path


def _enable_autoreload():
    """``%load_ext autoreload`` + ``%autoreload 2``; on first load, note current module mtimes.

    The extension records a module's mtime the first time it sees it and reloads only later
    changes, so it must see the loaded modules before this sync writes the new files.
    """
    ip = _ip()
    registry = ip.magics_manager.registry
    fresh = "AutoreloadMagics" not in registry
    if fresh:
        ip.run_line_magic("load_ext", "autoreload")
    ip.run_line_magic("autoreload", "2")
    reloader = getattr(registry.get("AutoreloadMagics"), "_reloader", None)
    if fresh and reloader is not None:
        try:
            reloader.check(do_reload=False)
        except Exception:  # noqa: BLE001,S110 - an old IPython: the reload comes one edit later
            pass


def plan(req):
    """Compare the local manifest with REMOTE_DIR; answer what differs.

    ``changed`` maps a path to ``[hash, who]``: ``hash`` is None when the file is absent here,
    ``""`` when the sizes differ, else the host copy's sha256; ``who`` says which side changed
    since the last sync: ``new`` (not written by sync), ``local``, ``host`` or ``both``.
    """
    root, same = _root(req["dir"], req.get("local"))
    if req.get("autoreload"):
        _enable_autoreload()
    if root not in sys.path:
        sys.path.insert(0, root)
    if same:
        return {"root": root, "same": True}
    owned = _load(root, cached=True) if os.path.isdir(root) else {}
    changed, local, base = {}, set(), root.rstrip("/") + "/"
    for rel, size, mtime in req["files"]:
        local.add(rel)
        path = base + rel
        st = _stat(path)
        rec = owned.get(rel)
        if rec and st and rec["l"] == [size, mtime] and rec["r"] == st:
            continue
        if st is None:
            changed[rel] = [None, "local"]
            continue
        host = rec is not None and rec["r"] != st
        mine = rec is None or rec["l"] != [size, mtime]
        who = "new" if rec is None else "both" if host and mine else "host" if host else "local"
        if st[0] != size:
            changed[rel] = ["", who]
        else:
            changed[rel] = [rec["h"] if rec and not host else _sha256(path), who]
    gone, kept = {}, []
    for rel, rec in owned.items():
        if rel in local or rec.get("adopted"):
            continue
        st = _stat(os.path.join(root, rel))
        if st is not None and st == rec["r"]:
            gone[rel] = [rec["h"], st[0]]
        elif st is not None:
            kept.append(rel)
    return {"root": root, "same": False, "changed": changed, "gone": gone, "kept": sorted(kept)}


def apply(req):
    """Write, rename, delete and re-stamp files as the local side decided; update the manifest."""
    root = req["root"]
    os.makedirs(root, exist_ok=True)
    owned = _load(root)
    data = dict(req.get("inline", {}))
    for rel, b64 in data.items():
        data[rel] = base64.b64decode(b64)
    data.update(_ip().user_ns.pop(DATA_VAR, None) or {})
    try:
        for src, dst, lst in req.get("renames", []):
            s, d = _safe(root, src), _safe(root, dst)
            rec = owned.pop(src)
            os.makedirs(os.path.dirname(d), exist_ok=True)
            os.replace(s, d)
            _drop_bytecode(d)
            _prune(root, os.path.dirname(s))
            owned[dst] = {"l": lst, "r": _stat(d), "h": rec["h"]}
        for rel, lst, digest, mode in req.get("writes", []):
            if rel in data:
                path = _write(root, rel, data.pop(rel), mode)
            else:  # a large file, uploaded to the staging directory by the file path
                path = _safe(root, rel)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                staged = os.path.join(root, STAGING, digest)
                if _sha256(staged) != digest:
                    msg = f"the uploaded copy of {rel!r} is corrupt; sync again"
                    raise SyncFailure(msg)
                os.chmod(staged, mode & 0o777)
                os.replace(staged, path)
                _drop_bytecode(path)
            owned[rel] = {"l": lst, "r": _stat(path), "h": digest}
        deleted, kept = [], []
        for rel in req.get("deletes", []):
            rec = owned.get(rel)
            path = _safe(root, rel)
            if rec is not None and _stat(path) == rec["r"]:
                os.remove(path)
                deleted.append(rel)
                _prune(root, os.path.dirname(path))
            elif _stat(path) is not None:
                kept.append(rel)
            owned.pop(rel, None)
        for rel, lst, digest in req.get("touches", []):
            # Equal content: re-stamp. A file sync did not write is adopted, never deleted.
            rec = {"l": lst, "r": _stat(_safe(root, rel)), "h": digest}
            if rel not in owned or owned[rel].get("adopted"):
                rec["adopted"] = True
            owned[rel] = rec
    finally:
        _save(root, owned)
        try:
            os.rmdir(os.path.join(root, STAGING))
        except OSError:
            pass
    importlib.invalidate_caches()
    return {"deleted": deleted, "kept": kept}


def _prune(root, directory):
    """Remove directories left empty by a delete, up to (not including) REMOTE_DIR."""
    while directory != root and directory.startswith(root + os.sep):
        try:
            os.rmdir(directory)
        except OSError:
            return
        directory = os.path.dirname(directory)


def listing(req):
    """REMOTE_DIR's files for ``--down``, with what sync owns there."""
    root, same = _root(req["dir"], req.get("local"))
    if same:
        return {"root": root, "same": True}
    if not os.path.isdir(root):
        msg = f"REMOTE_DIR {root} does not exist on the host; nothing to fetch"
        raise SyncFailure(msg)
    files = []
    for top, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _JUNK_DIRS)
        rel_top = os.path.relpath(top, root)
        for name in names:
            if name == MANIFEST or name.startswith(".colabmagic-sync-") or name.endswith(".pyc"):
                continue
            st = _stat(os.path.join(top, name))
            if st is not None:
                rel = name if rel_top == "." else f"{rel_top.replace(os.sep, '/')}/{name}"
                files.append([rel, st[0], st[1]])
    return {"root": root, "same": False, "files": files, "owned": _load(root, cached=True)}


def fetch(req):
    """Hash the requested files; send those whose hash differs from the local one.

    Small totals come back inline; larger ones wait in a namespace variable for ``pull``; a
    file marked ``big`` only gets its hash (the local side downloads it by the file path).
    """
    root = req["root"]
    ns = _ip().user_ns
    ns.pop(OUT_VAR, None)
    out, inline, stash = {}, {}, {}
    for rel, local_hash, big in req["files"]:
        path = _safe(root, rel)
        st = _stat(path)
        if st is None:
            out[rel] = None
            continue
        if big:
            data, digest = None, _sha256(path)
        else:
            with open(path, "rb") as f:
                data = f.read()
            digest = hashlib.sha256(data).hexdigest()
        out[rel] = [digest, st]
        if digest != local_hash and data is not None:
            stash[rel] = data
    if sum(len(v) for v in stash.values()) <= req.get("inline_limit", 0):
        inline = {k: base64.b64encode(v).decode() for k, v in stash.items()}
    elif stash:
        ns[OUT_VAR] = stash
    return {"files": out, "inline": inline, "stashed": sorted(stash) if not inline else []}


def drop(req):
    """Forget the stash of the last ``fetch`` (after the local side pulled it)."""
    _ip().user_ns.pop(OUT_VAR, None)
    return {}


def main(op, payload):
    try:
        reply = {"plan": plan, "apply": apply, "listing": listing, "fetch": fetch, "drop": drop}[
            op
        ](_decode(payload))
    except SyncFailure as exc:
        reply = {"error": str(exc)}
    except OSError as exc:
        reply = {"error": f"on the host: {exc}"}
    # Not flushed here: ipykernel flushes before its reply, so the answer, the reply and the
    # idle status leave together (one flight on the link, not two).
    sys.stdout.write(MARKER + _encode(reply) + "\n")
