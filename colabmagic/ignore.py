"""Which files make up a project: git's own ignore rules, ``--exclude`` patterns, and junk.

In a git work tree the listing is ``git ls-files --cached --others --exclude-standard`` (so
``.gitignore`` files, ``.git/info/exclude`` and the user's global excludes apply exactly as git
applies them, and tracked files stay listed even where a pattern matches them); outside git,
``.gitignore`` files are read with ``pathspec``. Used by :mod:`colabmagic.sync`.
"""

from __future__ import annotations

import os
import stat
import subprocess
from dataclasses import dataclass
from typing import Any

from colabmagic.errors import TransferError

ALWAYS_EXCLUDED = (".git/", "__pycache__/", "*.py[co]", ".ipynb_checkpoints/", ".colabmagic-sync*")
_JUNK_DIRS = frozenset({".git", "__pycache__", ".ipynb_checkpoints"})


def _junk(rel: str) -> bool:
    """:data:`ALWAYS_EXCLUDED`, by string tests (pattern matching costs ~30 us a path)."""
    parts = rel.rstrip("/").split("/")
    name = parts[-1]
    if name.startswith(".colabmagic-sync") or name.endswith((".pyc", ".pyo")):
        return True
    return not _JUNK_DIRS.isdisjoint(parts if rel.endswith("/") else parts[:-1])


@dataclass(frozen=True)
class ProjectFile:
    """A regular file of the project: absolute path, size, mtime and permission bits."""

    path: str
    size: int
    mtime_ns: int
    mode: int


class IgnoreRules:
    """Which paths under *root* a sync skips: ``.gitignore`` (git's own rules), *exclude*, junk.

    Parameters
    ----------
    root
        The local project directory.
    exclude
        Extra patterns in gitignore syntax (``data/``, ``*.ckpt``, ``/notes.md``).
    gitignore
        Honour ``.gitignore`` (default).
    """

    def __init__(self, root: str, exclude: tuple[str, ...] = (), *, gitignore: bool = True):
        import pathspec

        self.root = root
        self.gitignore = gitignore
        self._exclude = pathspec.GitIgnoreSpec.from_lines(exclude) if exclude else None
        self._git: bool | None = None if gitignore else False

    @property
    def git(self) -> bool:
        """True when *root* is in a git work tree (and ``.gitignore`` is honoured)."""
        if self._git is None:
            self._git = _in_git(self.root)
        return self._git

    def excluded(self, rel: str) -> bool:
        """True for a path the exclude patterns (or the always-excluded junk) name."""
        return _junk(rel) or (self._exclude is not None and self._exclude.match_file(rel))

    def files(self) -> dict[str, ProjectFile]:
        """The project's files, keyed by POSIX path relative to *root*."""
        rels = self._git_files() if self._git is not False else None
        if rels is None:
            rels = self._walk()
        found = {}
        base = self.root.rstrip("/") + "/"
        for rel in rels:
            if self.excluded(rel):
                continue
            path = base + rel
            try:
                st = os.stat(path)
            except OSError:
                continue  # deleted but still in git's index, or a broken symlink
            if stat.S_ISREG(st.st_mode):
                found[rel] = ProjectFile(path, st.st_size, st.st_mtime_ns, st.st_mode & 0o777)
        return found

    def _git_files(self) -> list[str] | None:
        """``git ls-files`` (cached and untracked, not ignored), or None outside a work tree."""
        argv = ["git", "-C", self.root, "ls-files", "-z", "--cached", "--others"]
        try:
            proc = subprocess.run([*argv, "--exclude-standard"], capture_output=True, check=False)
        except OSError:  # git is not installed: .gitignore through pathspec
            proc = None
        self._git = proc is not None and proc.returncode == 0
        if not self._git:
            return None
        return sorted({r for r in proc.stdout.decode("utf-8", "surrogateescape").split("\0") if r})

    def _walk(self) -> list[str]:
        specs: list[tuple[str, Any]] = []
        rels = []
        for top, dirs, names in os.walk(self.root):
            rel_top = os.path.relpath(top, self.root).replace(os.sep, "/")
            rel_top = "" if rel_top == "." else rel_top + "/"
            if self.gitignore and ".gitignore" in names:
                specs.append((rel_top, _spec(os.path.join(top, ".gitignore"))))
            keep = []
            for d in sorted(dirs):
                rel = rel_top + d + "/"
                if not self.excluded(rel) and not _ignored_by(specs, rel):
                    keep.append(d)
            dirs[:] = keep
            rels += [rel_top + n for n in names if not _ignored_by(specs, rel_top + n)]
        return rels

    def ignored(self, rels: list[str]) -> set[str]:
        """The subset of *rels* (paths that need not exist here) the rules skip."""
        out = {r for r in rels if self.excluded(r)}
        rest = [r for r in rels if r not in out]
        if not self.gitignore or not rest:
            return out
        if self.git:
            proc = subprocess.run(
                ["git", "-C", self.root, "check-ignore", "--stdin", "-z"],
                input="\0".join(rest).encode("utf-8", "surrogateescape"),
                capture_output=True,
                check=False,
            )
            if proc.returncode not in (0, 1):
                msg = f"git check-ignore failed in {self.root}: {proc.stderr.decode().strip()}"
                raise TransferError(msg)
            return out | {
                r for r in proc.stdout.decode("utf-8", "surrogateescape").split("\0") if r
            }
        specs = []
        for top, _, names in os.walk(self.root):
            if ".gitignore" in names:
                rel_top = os.path.relpath(top, self.root).replace(os.sep, "/")
                specs.append(("" if rel_top == "." else rel_top + "/", _spec(f"{top}/.gitignore")))
        return out | {r for r in rest if _ignored_by(specs, r, parents=True)}


def _spec(path: str):
    import pathspec

    with open(path, encoding="utf-8", errors="replace") as f:
        return pathspec.GitIgnoreSpec.from_lines(f)


def _ignored_by(specs: list, rel: str, *, parents: bool = False) -> bool:
    """gitignore semantics over nested ``.gitignore`` files: the deepest decision wins."""
    candidates = [rel]
    if parents:  # a path that need not exist here: an ignored parent directory ignores it
        parts = rel.split("/")
        candidates = ["/".join(parts[:i]) + "/" for i in range(1, len(parts))] + [rel]
    for cand in candidates:
        verdict = None
        for base, spec in specs:
            if cand.startswith(base) and cand != base:
                result = spec.check_file(cand[len(base) :])
                if result.include is not None:
                    verdict = result.include
        if verdict:
            return True
    return False


def _in_git(root: str) -> bool:
    try:
        proc = subprocess.run(
            ["git", "-C", root, "rev-parse", "--is-inside-work-tree"],
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError:  # git is not installed: .gitignore through pathspec
        return False
    return proc.returncode == 0 and proc.stdout.strip() == "true"
