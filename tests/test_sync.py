"""Project sync against real kernels (local, and over a real sshd through the WAN relay)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

import colabmagic
from colabmagic import sync
from colabmagic.errors import ParameterError, TransferError
from colabmagic.relay import QuietRelay
from colabmagic.session import Session, registry


@pytest.fixture(scope="module")
def session():
    s = colabmagic.connect(local=True, name="sync", register=False)
    yield s
    s.close()


def tree(root) -> dict[str, bytes]:
    """Every file under *root* (sync's own bookkeeping left out) -> its bytes."""
    out = {}
    for top, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in ("__pycache__", ".git")]
        for n in names:
            if n.startswith(".colabmagic-sync"):
                continue
            path = os.path.join(top, n)
            out[os.path.relpath(path, root)] = open(path, "rb").read()
    return out


def write(path, text: str | bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(text.encode() if isinstance(text, str) else text)


def project(root, files: dict[str, str]) -> None:
    for rel, text in files.items():
        write(os.path.join(root, rel), text)


def git(root, *args: str) -> None:
    subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True)


def test_edits_deletes_and_renames_are_mirrored(session, tmp_path):
    local, remote = tmp_path / "proj", tmp_path / "remote"
    project(local, {"a.py": "A = 1\n", "pkg/b.py": "B = 2\n", "pkg/sub/c.txt": "c" * 5000})
    first = sync.Syncer(session, str(local), str(remote)).up()
    assert sorted(first.sent) == ["a.py", "pkg/b.py", "pkg/sub/c.txt"]
    assert tree(remote) == tree(local)

    write(local / "a.py", "A = 100  # edited\n")
    os.remove(local / "pkg/b.py")
    os.rename(local / "pkg/sub/c.txt", local / "moved.txt")
    os.rmdir(local / "pkg/sub")
    res = sync.Syncer(session, str(local), str(remote)).up()
    assert res.sent == ["a.py"]
    assert res.renamed == [("pkg/sub/c.txt", "moved.txt")]  # moved on the host, not resent
    assert res.deleted == ["pkg/b.py"]
    assert res.bytes == len("A = 100  # edited\n")
    assert tree(remote) == tree(local)
    assert not (remote / "pkg").exists(), "directories emptied by deletes are removed"


def test_a_no_change_sync_is_one_request_with_no_file_data(session, tmp_path, monkeypatch):
    local, remote = tmp_path / "proj", tmp_path / "remote"
    project(local, {f"m{i // 100}/f{i}.py": f"x = {i}\n" for i in range(2000)})
    sync.Syncer(session, str(local), str(remote)).up()
    hashed = []
    original = sync._sha256
    monkeypatch.setattr(sync, "_sha256", lambda p: hashed.append(p) or original(p))

    res = sync.Syncer(session, str(local), str(remote)).up()
    assert (res.requests, res.bytes, res.sent, res.files) == (1, 0, [], 2000)
    assert hashed == []

    # A touched file (mtime moved, content equal) is hashed, re-stamped, and still not sent.
    os.utime(local / "m3/f300.py", ns=(1, 1))
    res = sync.Syncer(session, str(local), str(remote)).up()
    assert (res.touched, res.sent, res.bytes) == (["m3/f300.py"], [], 0)
    assert [os.path.basename(p) for p in hashed] == ["f300.py"]
    assert sync.Syncer(session, str(local), str(remote)).up().requests == 1


def test_files_made_on_the_host_are_never_deleted(session, tmp_path):
    local, remote = tmp_path / "proj", tmp_path / "remote"
    project(local, {"keep.py": "k\n", "gone.py": "g\n", "edited_there.py": "e\n"})
    write(remote / "user_notes.txt", "mine")  # was there before any sync
    sync.Syncer(session, str(local), str(remote)).up()
    write(remote / "made_there.txt", "also mine")
    write(remote / "edited_there.py", "changed on the host\n")
    os.remove(local / "gone.py")
    os.remove(local / "edited_there.py")
    res = sync.Syncer(session, str(local), str(remote)).up()
    assert res.deleted == ["gone.py"]
    assert res.kept == ["edited_there.py"]
    assert "not deleted (changed on the host: edited_there.py)" in res.summary()
    assert sorted(tree(remote)) == [
        "edited_there.py",
        "keep.py",
        "made_there.txt",
        "user_notes.txt",
    ]


def test_up_never_overwrites_newer_host_copies_unless_forced(session, tmp_path):
    local, remote = tmp_path / "proj", tmp_path / "remote"
    project(local, {"cfg.txt": "lr=1\n", "model.py": "v1\n"})
    sync.Syncer(session, str(local), str(remote)).up()
    write(remote / "cfg.txt", "lr=0.5, tuned on the host\n")  # only the host changed it
    write(remote / "model.py", "host edit\n")
    write(local / "model.py", "local edit\n")  # both sides changed it
    res = sync.Syncer(session, str(local), str(remote)).up()
    assert (res.sent, res.skipped, res.conflicts) == ([], ["cfg.txt"], ["model.py"])
    assert "changed on both sides: model.py; --force overwrites" in res.summary()
    assert (remote / "cfg.txt").read_text() == "lr=0.5, tuned on the host\n"
    assert (remote / "model.py").read_text() == "host edit\n"
    res = sync.Syncer(session, str(local), str(remote), force=True).up()
    assert res.sent == ["cfg.txt", "model.py"]
    assert tree(remote) == tree(local)


def test_newly_excluded_and_adopted_files_are_not_deleted_on_the_host(session, tmp_path):
    local, remote = tmp_path / "proj", tmp_path / "remote"
    project(local, {"a.py": "a\n", "data/x.bin": "x", "same.py": "identical\n"})
    write(remote / "same.py", "identical\n")  # the user's own copy, already there
    first = sync.Syncer(session, str(local), str(remote)).up()
    assert (first.touched, sorted(first.sent)) == (["same.py"], ["a.py", "data/x.bin"])
    res = sync.Syncer(session, str(local), str(remote), exclude=["data/"]).up()
    assert res.deleted == []
    assert (remote / "data/x.bin").exists()
    os.remove(local / "same.py")
    assert sync.Syncer(session, str(local), str(remote)).up().deleted == []
    assert (remote / "same.py").read_text() == "identical\n"


def test_a_lost_or_corrupt_manifest_sends_nothing_and_deletes_nothing(session, tmp_path):
    local, remote = tmp_path / "proj", tmp_path / "remote"
    project(local, {"a.py": "a\n", "b.py": "b\n", "c.py": "c\n"})
    sync.Syncer(session, str(local), str(remote)).up()
    write(remote / ".colabmagic-sync.json", '{"version": 1, "files": {"a.py": {"l": 3}}}')
    res = sync.Syncer(session, str(local), str(remote)).up()
    assert (res.sent, res.touched) == ([], ["a.py", "b.py", "c.py"])  # hashed, found equal
    os.remove(local / "b.py")
    assert sync.Syncer(session, str(local), str(remote)).up().deleted == []
    assert (remote / "b.py").exists()
    os.remove(remote / ".colabmagic-sync.json")
    res = sync.Syncer(session, str(local), str(remote)).up()
    assert (res.sent, res.deleted) == ([], [])


def test_gitignore_is_honoured_in_a_real_git_repo(session, tmp_path):
    local, remote = tmp_path / "repo", tmp_path / "remote"
    project(
        local,
        {
            ".gitignore": "build/\n*.log\ndata/\n",
            "src/model.py": "m\n",
            "build/out.o": "o",
            "run.log": "log",
            "data/tracked.csv": "1,2\n",
            "data/big.bin": "x" * 100,
            "untracked_new.py": "n\n",
            "__pycache__/junk.pyc": "pyc",
        },
    )
    git(local, "init", "-q")
    git(local, "add", "-f", ".gitignore", "src/model.py", "data/tracked.csv")
    write(local / ".git/info/exclude", "secret.txt\n")
    write(local / "secret.txt", "s")
    res = sync.Syncer(session, str(local), str(remote)).up()
    assert sorted(res.sent) == [
        ".gitignore",
        "data/tracked.csv",  # tracked, so git lists it although data/ is ignored
        "src/model.py",
        "untracked_new.py",
    ]
    assert sorted(tree(remote)) == sorted(res.sent)


def test_gitignore_outside_git_and_exclude_patterns(session, tmp_path):
    local, remote = tmp_path / "plain", tmp_path / "remote"
    project(
        local,
        {
            ".gitignore": "*.ckpt\nout/\n",
            "sub/.gitignore": "local_only.txt\n!keep.ckpt\n",
            "train.py": "t\n",
            "model.ckpt": "w",
            "sub/keep.ckpt": "k",
            "sub/local_only.txt": "l",
            "out/x.txt": "x",
            "data/raw.bin": "r",
            "notes.md": "n",
        },
    )
    res = sync.Syncer(session, str(local), str(remote), exclude=["data/", "/notes.md"]).up()
    assert sorted(res.sent) == [".gitignore", "sub/.gitignore", "sub/keep.ckpt", "train.py"]
    every = sync.Syncer(session, str(local), str(remote), gitignore=False).up()
    assert "model.ckpt" in every.sent
    assert "out/x.txt" in every.sent


def test_down_fetches_outputs_and_never_clobbers_local_edits(session, tmp_path):
    local, remote = tmp_path / "proj", tmp_path / "remote"
    project(
        local, {"train.py": "print('train')\n", "results.csv": "mine\n", ".gitignore": "*.tmp\n"}
    )
    s = sync.Syncer(session, str(local), str(remote))
    s.up()
    session.run(
        f"import os; os.chdir({str(remote)!r}); os.makedirs('runs', exist_ok=True)\n"
        "open('runs/metrics.json', 'w').write('{\"loss\": 0.1}')\n"
        "open('scratch.tmp', 'w').write('ignored')\n"
        "open('results.csv', 'w').write('from the host\\n')",
        relay=QuietRelay(),
    )
    res = s.down()
    assert res.sent == ["runs/metrics.json", "results.csv"] or sorted(res.sent) == [
        "results.csv",
        "runs/metrics.json",
    ]
    assert (local / "runs/metrics.json").read_text() == '{"loss": 0.1}'
    assert (local / "results.csv").read_text() == "from the host\n"  # unchanged here since up
    assert not (local / "scratch.tmp").exists(), ".gitignore applies to --down too"
    assert s.down().requests == 1
    assert s.down().sent == []

    # Changed on both sides: the local edit is kept, and said so.
    write(local / "runs/metrics.json", "edited here")
    session.run("open('runs/metrics.json', 'w').write('newer on the host')", relay=QuietRelay())
    res = s.down()
    assert res.conflicts == ["runs/metrics.json"]
    assert (local / "runs/metrics.json").read_text() == "edited here"

    # Deleted on the host: a fetched file unchanged here goes too; an edited one stays.
    session.run(
        "import os; os.remove('results.csv'); os.remove('runs/metrics.json')", relay=QuietRelay()
    )
    res = s.down()
    assert res.deleted == ["results.csv"]
    assert res.kept == ["runs/metrics.json"]
    assert (local / "train.py").exists()
    session.run(f"os.chdir({session.remote_info['cwd']!r})", relay=QuietRelay())


def test_outputs_fetched_down_are_not_pushed_back_up(session, tmp_path):
    local, remote = tmp_path / "proj", tmp_path / "remote"
    project(local, {"train.py": "t\n"})
    s = sync.Syncer(session, str(local), str(remote))
    s.up()
    write(remote / "metrics.json", "epoch 1")
    assert s.down().sent == ["metrics.json"]
    write(remote / "metrics.json", "epoch 2 -- longer")  # the run goes on
    res = s.up()
    assert (res.sent, res.skipped, res.conflicts) == ([], [], [])
    assert (remote / "metrics.json").read_text() == "epoch 2 -- longer"
    assert s.down().sent == ["metrics.json"]
    assert (local / "metrics.json").read_text() == "epoch 2 -- longer"


def test_down_keeps_fetched_files_that_became_ignored(session, tmp_path):
    local, remote = tmp_path / "proj", tmp_path / "remote"
    project(local, {"train.py": "t\n"})
    s = sync.Syncer(session, str(local), str(remote))
    s.up()
    write(remote / "logs/run.log", "log")
    assert s.down().sent == ["logs/run.log"]
    write(local / ".gitignore", "logs/\n")  # ignored from now on, but still on the host
    res = s.down()
    assert (res.sent, res.deleted) == ([], [])
    assert (local / "logs/run.log").read_text() == "log"


def test_large_files_go_through_the_file_path_and_batches_through_push(
    session, tmp_path, monkeypatch
):
    monkeypatch.setattr(sync, "BIG_FILE", 4096)
    monkeypatch.setattr(sync, "INLINE_LIMIT", 100)
    monkeypatch.setattr(sync, "BATCH_LIMIT", 1000)
    local, remote = tmp_path / "proj", tmp_path / "remote"
    big = os.urandom(50_000)
    project(local, {f"small{i}.txt": f"{i}" * 300 for i in range(10)})
    write(local / "weights.bin", big)
    res = sync.Syncer(session, str(local), str(remote)).up()
    assert tree(remote) == tree(local)
    # plan + upload + final apply, and 10 x 300 B in batches flushed at >= 1000 B (4 + 4 + 2
    # files): 3 x (push + apply)
    assert res.requests == 3 + 3 * 2
    assert not (remote / ".colabmagic-sync-staging").exists()

    out = os.urandom(20_000)
    session.run(f"open({str(remote / 'out.bin')!r}, 'wb').write({out!r})", relay=QuietRelay())
    session.run(
        "\n".join(f"open({str(remote / f'o{i}.txt')!r}, 'w').write('{i}' * 400)" for i in range(4)),
        relay=QuietRelay(),
    )
    res = sync.Syncer(session, str(local), str(remote)).down()
    assert sorted(res.sent) == ["o0.txt", "o1.txt", "o2.txt", "o3.txt", "out.bin"]
    assert (local / "out.bin").read_bytes() == out
    assert tree(remote) == tree(local)


def test_bad_input_is_one_clear_line(session, tmp_path):
    local = tmp_path / "proj"
    project(local, {"a.py": "a\n"})
    with pytest.raises(ParameterError, match=r"LOCAL_DIR .*missing does not exist"):
        sync.Syncer(session, str(tmp_path / "missing"))
    with pytest.raises(ParameterError, match="is not a directory"):
        sync.Syncer(session, str(local / "a.py"))
    with pytest.raises(ParameterError, match="--exclude needs a pattern"):
        sync.Syncer(session, str(local), "x", exclude=[" "])
    write(tmp_path / "afile", "x")
    with pytest.raises(TransferError, match="afile is a file on the host; give a directory"):
        sync.Syncer(session, str(local), str(tmp_path / "afile")).up()
    with pytest.raises(TransferError, match="is the file-system root"):
        sync.Syncer(session, str(local), "/").up()
    with pytest.raises(TransferError, match="inside LOCAL_DIR on the same machine"):
        sync.Syncer(session, str(local), str(local / "copy")).up()
    with pytest.raises(TransferError, match="does not exist on the host"):
        sync.Syncer(session, str(local), str(tmp_path / "nothing")).down()
    same = sync.Syncer(session, str(local), str(local)).up()
    assert same.same_dir
    assert "the same directory" in same.summary()
    assert not (tmp_path / "copy").exists()
    assert not (local / ".colabmagic-sync.json").exists()


# -- the magics, in a real IPython shell -----------------------------------------------------
@pytest.fixture(scope="module")
def ip():
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "colabmagic")
    shell.run_line_magic("colab_connect", "--local --name syncmagic")
    yield shell
    shell.run_line_magic("colab_disconnect", "syncmagic")
    shell.run_line_magic("unload_ext", "colabmagic")
    registry.close_all()


def test_autoreload_picks_up_an_edited_function_between_two_gpu_run_cells(ip, tmp_path, capsys):
    local, remote = tmp_path / "proj", tmp_path / "remote"
    project(local, {"model.py": "def predict(x):\n    return x + 1\n"})
    ip.run_line_magic("colab_sync", f"{local} {remote} --autoreload")
    assert "1 sent" in capsys.readouterr().out
    ip.run_cell_magic("gpu_run", "", "from model import predict\nprint('v1', predict(1))")
    assert "v1 2" in capsys.readouterr().out

    write(local / "model.py", "def predict(x):\n    return x * 9\n")  # same size, same second
    ip.run_cell_magic("gpu_run", "--sync", "print('v2', predict(1))")
    out = capsys.readouterr().out
    assert "1 sent" in out
    assert "v2 9" in out

    magics = ip.magics_manager.registry["ColabMagics"]
    magics.auto_sync = True
    try:
        write(local / "extra.py", "VALUE = 7\n")
        ip.run_cell_magic("gpu_run", "", "import extra; print('extra', extra.VALUE)")
        assert "extra 7" in capsys.readouterr().out
        write(local / "extra.py", "VALUE = 8\n")
        ip.run_cell_magic("gpu_run", "--no-sync", "print('extra', extra.VALUE)")
        assert "extra 7" in capsys.readouterr().out
    finally:
        magics.auto_sync = False


def test_colab_sync_magic_down_exclude_and_errors(ip, tmp_path, capsys):
    local, remote = tmp_path / "proj", tmp_path / "remote"
    project(local, {"a.py": "a\n", "data/big.bin": "d"})
    ip.run_line_magic("colab_sync", f"{local} {remote} --exclude data/")
    assert "1 sent" in capsys.readouterr().out
    assert sorted(tree(remote)) == ["a.py"]
    write(remote / "out.txt", "result")
    ip.run_line_magic("colab_sync", "--down")
    out = capsys.readouterr().out
    assert "<-" in out
    assert "1 fetched" in out
    assert (local / "out.txt").read_text() == "result"
    with pytest.raises(UsageError, match=r"LOCAL_DIR .* does not exist"):
        ip.run_line_magic("colab_sync", f"{tmp_path / 'missing'} x")
    result = ip.run_cell(f"%colab_sync {local} {local / 'inner'}")
    assert isinstance(result.error_in_exec, UsageError)
    assert "inside LOCAL_DIR" in str(result.error_in_exec)
    assert "Example" in ip.find_line_magic("colab_sync").__doc__


# -- over SSH, through the emulated WAN ------------------------------------------------------
@pytest.mark.ssh
def test_over_ssh_a_no_change_sync_is_at_most_two_round_trips(
    sshd_server, tmp_path, colabmagic_root, monkeypatch
):
    from colabmagic.testing_wan import WanRelay
    from colabmagic.transport.ssh import SSHTransport

    local = tmp_path / "proj"
    project(local, {f"pkg{i // 100}/m{i}.py": f"V = {i}\n" for i in range(2000)})
    with WanRelay(("127.0.0.1", sshd_server.port), delay=0.025) as wan:
        cfg = tmp_path / "ssh_config"
        hop = f"{sys.executable} -m colabmagic.testing_wan --delay 0 127.0.0.1 {wan.port}"
        cfg.write_text(sshd_server.config_block(ProxyCommand=hop))
        t = SSHTransport(
            sshd_server.name,
            ssh_config=str(cfg),
            python=sys.executable,
            root=str(colabmagic_root),
            connect_timeout=20,
        )
        s = Session.start(t, name="sync-ssh")
        try:
            remote = str(tmp_path / "remote")
            first = sync.Syncer(s, str(local), remote).up()
            assert len(first.sent) == 2000
            assert tree(remote) == tree(local)

            wan.reset_counters()
            s.run("pass", relay=QuietRelay())
            cell_turns = wan.round_trips()  # a cell's own turns: request, then the link's acks
            wan.reset_counters()
            res = sync.Syncer(s, str(local), remote).up()
            turns, up, down = wan.round_trips(), wan.bytes_up, wan.bytes_down
            assert (res.requests, res.bytes, res.sent) == (1, 0, [])
            assert turns <= max(2, cell_turns), f"{turns} round trips (a cell: {cell_turns})"
            assert up < 64_000, f"the manifest request is {up} bytes"

            write(local / "pkg7/m700.py", "V = 'edited'\n")
            os.remove(local / "pkg0/m1.py")
            res = sync.Syncer(s, str(local), remote).up()
            assert (res.sent, res.deleted, res.requests) == (["pkg7/m700.py"], ["pkg0/m1.py"], 2)
            assert tree(remote) == tree(local)
            assert down < 64_000

            # Big files go through SFTP both ways (threshold lowered to keep the test small).
            monkeypatch.setattr(sync, "BIG_FILE", 4096)
            weights, out = os.urandom(40_000), os.urandom(30_000)
            write(local / "weights.bin", weights)
            assert sync.Syncer(s, str(local), remote).up().sent == ["weights.bin"]
            write(os.path.join(remote, "out.bin"), out)
            assert sync.Syncer(s, str(local), remote).down().sent == ["out.bin"]
            assert (local / "out.bin").read_bytes() == out
            assert tree(remote) == tree(local)
        finally:
            s.close()
