"""``%colab_snapshot``: named variables of the remote kernel kept on this machine, and put back.

A Colab runtime is recycled after idling or after 12-24 h and takes the kernel's variables with
it. :func:`save` pulls the named variables into ``~/.colabmagic/snapshots/NAME/`` (torch tensors,
state_dicts and CuPy arrays are copied to host memory *in the kernel* first); :func:`load` pushes
them into whatever kernel is connected now, e.g. the new runtime's.

The values travel as pickle protocol 5 with out-of-band buffers (:mod:`colabmagic.serialize`,
the same frames push and pull use) and are stored as those frames, unopened: saving needs no torch
or CuPy here, and an array's memory is written and read back without copies. On disk:
``meta.json`` (names, frame sizes, when, from where) and ``frames.bin`` (the frames, back to back);
a snapshot is written into a temporary directory and renamed into place, so a crash never leaves
half a snapshot under its name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from typing import Any

from colabmagic.errors import ParameterError, TransferError

ROOT = "~/.colabmagic/snapshots"
FORMAT = 1
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def _root(root: str | None) -> str:
    return os.path.expanduser(root or ROOT)


def _dir(name: str, root: str | None) -> str:
    if not _NAME_RE.match(name or ""):
        msg = f"snapshot name {name!r} must be letters, digits, '.', '-' or '_' (e.g. epoch3)"
        raise ParameterError(msg)
    return os.path.join(_root(root), name)


def save(session, name: str, names: list[str], *, root: str | None = None) -> dict[str, Any]:
    """Pull *names* from *session*'s kernel into snapshot *name* (replacing one of that name).

    Returns
    -------
    dict
        The snapshot's metadata (``names``, ``bytes``, ``created``, ``source``).
    """
    if not names:
        msg = "name the variables to save, e.g. %colab_snapshot save epoch3 model_state losses"
        raise ParameterError(msg)
    bad = [n for n in names if not n.isidentifier()]
    if bad:
        msg = f"{bad[0]!r} is not a valid variable name"
        raise ParameterError(msg)
    final = _dir(name, root)
    # The kernel copies device memory to the CPU before pickling ("cpu"); the frames are stored
    # as they come, never unpickled here.
    _, frames = session.bulk.request("pull", names=list(names), cpu=True)
    sizes = [memoryview(f).nbytes for f in frames]
    meta = {
        "format": FORMAT,
        "names": list(names),
        "frames": sizes,
        "bytes": sum(sizes),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": session.transport.target,
    }
    os.makedirs(_root(root), mode=0o700, exist_ok=True)
    tmp = f"{final}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.mkdir(tmp, 0o700)
    try:
        with open(os.path.join(tmp, "frames.bin"), "wb") as f:
            for frame in frames:
                f.write(frame)
            f.flush()
            os.fsync(f.fileno())
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        old = f"{final}.old-{os.getpid()}"
        if os.path.exists(final):
            os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def info(name: str, *, root: str | None = None) -> dict[str, Any]:
    """The metadata of snapshot *name*; ParameterError naming the ones there are if missing."""
    path = os.path.join(_dir(name, root), "meta.json")
    try:
        with open(path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        have = ", ".join(r["name"] for r in list_snapshots(root=root)) or "none"
        msg = f"no snapshot {name!r} in {_root(root)} (there are: {have})"
        raise ParameterError(msg) from None
    except (OSError, ValueError) as exc:
        msg = f"snapshot {name!r} is damaged ({exc}); remove it: %colab_snapshot --delete {name}"
        raise TransferError(msg) from None
    if meta.get("format") != FORMAT:
        msg = f"snapshot {name!r} has format {meta.get('format')!r}; this colabmagic reads {FORMAT}"
        raise TransferError(msg)
    return meta


def load(session, name: str, *, root: str | None = None) -> list[str]:
    """Push the variables of snapshot *name* into *session*'s kernel; return their names."""
    meta = info(name, root=root)
    path = os.path.join(_dir(name, root), "frames.bin")
    with open(path, "rb") as f:
        data = bytearray(f.read())
    if len(data) != meta["bytes"]:
        msg = (
            f"snapshot {name!r} is truncated ({len(data)} of {meta['bytes']} bytes); "
            f"delete it with %colab_snapshot --delete {name}"
        )
        raise TransferError(msg)
    view, frames, pos = memoryview(data), [], 0
    for size in meta["frames"]:
        frames.append(view[pos : pos + size])
        pos += size
    session.bulk.request("push", buffers=frames, names=sorted(meta["names"]))
    return list(meta["names"])


def list_snapshots(*, root: str | None = None) -> list[dict[str, Any]]:
    """One row per snapshot: name, variables, bytes, created, source."""
    base = _root(root)
    rows = []
    for entry in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        if not _NAME_RE.match(entry) or ".tmp-" in entry or ".old-" in entry:
            continue
        try:
            with open(os.path.join(base, entry, "meta.json")) as f:
                meta = json.load(f)
        except (OSError, ValueError):
            continue
        rows.append(
            {
                "name": entry,
                "variables": ", ".join(meta.get("names", [])),
                "bytes": meta.get("bytes"),
                "created": meta.get("created"),
                "source": meta.get("source"),
            }
        )
    return rows


def delete(name: str, *, root: str | None = None) -> None:
    """Remove snapshot *name*."""
    info(name, root=root)  # a clear error when it does not exist
    shutil.rmtree(_dir(name, root))
