"""The magics in a real IPython shell, against real local kernels through the link."""

from __future__ import annotations

import json

import numpy as np
import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

from colabmagic.errors import CellTimeoutError, RemoteError
from colabmagic.relay import RemoteDisplay
from colabmagic.session import registry
from colabmagic.testing import wait_until
from colabmagic.transport.local import LocalTransport


@pytest.fixture(scope="module")
def ip():
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "colabmagic")
    yield shell
    shell.run_line_magic("unload_ext", "colabmagic")
    registry.close_all()


@pytest.fixture(scope="module")
def connected(ip):
    ip.run_line_magic("colab_connect", "--local --mock-gpu")
    yield ip
    if "default" in registry.names():
        ip.run_line_magic("colab_disconnect", "")


def run(ip, source: str):
    """Run a cell the way a notebook does; return its ExecutionResult."""
    return ip.run_cell(source, store_history=True)


def test_every_magic_has_help_with_an_example(ip):
    for name in (
        "colab_connect",
        "colab_push",
        "colab_pull",
        "colab_status",
        "colab_kernels",
        "colab_disconnect",
        "colab_upload",
        "colab_download",
        "colab_debug",
        "colab_snapshot",
    ):
        doc = ip.find_line_magic(name).__doc__
        assert "usage" in doc.lower() or "%" in doc, name
        assert "Example" in doc, name
    assert "Example" in ip.find_cell_magic("gpu_run").__doc__


def test_gpu_run_before_connect_is_a_one_line_usage_error(ip, capsys):
    registry.close_all()
    with pytest.raises(UsageError, match="run %colab_connect first"):
        ip.run_cell_magic("gpu_run", "", "print(1)")
    result = run(ip, "%%gpu_run\nprint(1)")
    assert isinstance(result.error_in_exec, UsageError)
    err = capsys.readouterr()
    assert "Traceback" not in err.out + err.err


def test_the_issue_example_prints_45_and_shows_the_plot(connected, capsys):
    displayed = []
    pub = connected.display_pub
    original = pub.publish
    pub.publish = lambda data, metadata=None, **kw: displayed.append(data)
    try:
        result = run(
            connected,
            "%%gpu_run\nimport cupy as cp, matplotlib.pyplot as plt\n"
            "x = cp.arange(10); print(x.sum()); plt.plot(cp.asnumpy(x)); plt.show()",
        )
    finally:
        pub.publish = original
    assert result.success
    assert capsys.readouterr().out.strip() == "45"
    assert any("image/png" in d for d in displayed)


def test_cell_value_becomes_out(connected):
    result = run(connected, "%%gpu_run\n6 * 7")
    assert isinstance(result.result, RemoteDisplay)
    assert repr(result.result) == "42"


def test_line_form(connected, capsys):
    connected.run_line_magic("gpu_run", "print('line form')")
    assert capsys.readouterr().out == "line form\n"


def test_remote_error_fails_the_cell_with_the_remote_traceback(connected, capsys):
    result = run(connected, "%%gpu_run\ndef boom():\n    raise ValueError('remote bad')\nboom()")
    assert isinstance(result.error_in_exec, RemoteError)
    assert result.error_in_exec.ename == "ValueError"
    out = capsys.readouterr()
    shown = out.out + out.err
    assert "remote bad" in shown
    assert "boom()" in shown
    assert "colabmagic/session.py" not in shown, "our own frames must not be shown"


def test_push_pull_flags_and_magics(connected):
    connected.user_ns["local_arr"] = np.arange(5)
    run(
        connected,
        "%%gpu_run --push local_arr --pull total,doubled\n"
        "total = int(local_arr.sum())\ndoubled = local_arr * 2",
    )
    assert connected.user_ns["total"] == 10
    np.testing.assert_array_equal(connected.user_ns["doubled"], np.arange(5) * 2)
    connected.user_ns["msg"] = "hello"
    connected.run_line_magic("colab_push", "msg")
    connected.run_line_magic("gpu_run", "echo = msg.upper()")
    connected.run_line_magic("colab_pull", "echo")
    assert connected.user_ns["echo"] == "HELLO"


def test_compress_option_on_push_pull_upload_download(connected, tmp_path, capsys):
    big = np.zeros(3 << 20, dtype=np.float32)
    big[::10] = 1.5
    connected.user_ns["big"] = big
    connected.run_line_magic("colab_push", "big --compress zstd")
    connected.run_line_magic("gpu_run", "big2 = big * 2")
    connected.run_line_magic("colab_pull", "big2 --compress none")
    np.testing.assert_array_equal(connected.user_ns["big2"], big * 2)
    src = tmp_path / "w.npy"
    np.save(src, big)
    connected.run_line_magic("colab_upload", f"{src} {tmp_path / 'up.npy'} --compress auto")
    back = tmp_path / "back.npy"
    connected.run_line_magic("colab_download", f"{tmp_path / 'up.npy'} {back} --compress zstd")
    np.testing.assert_array_equal(np.load(back), big)
    assert "uploaded" in capsys.readouterr().out
    assert not list(tmp_path.glob(".*colabmagic-part"))
    with pytest.raises(UsageError, match="invalid choice: 'gzip'"):
        connected.run_line_magic("colab_push", "big --compress gzip")


def test_bad_input_gives_one_line_errors(connected):
    with pytest.raises(UsageError, match="not defined locally"):
        connected.run_line_magic("colab_push", "undefined_thing")
    with pytest.raises(UsageError, match="not a valid variable name"):
        connected.run_line_magic("colab_push", "1abc")
    with pytest.raises(UsageError, match=r"no session named 'nope'; known sessions: default"):
        connected.run_cell_magic("gpu_run", "--on nope", "print(1)")
    with pytest.raises(UsageError, match=r"unrecognized arguments|usage"):
        connected.run_cell_magic("gpu_run", "--bogus-flag", "print(1)")
    with pytest.raises(UsageError, match="nothing to run"):
        connected.run_cell_magic("gpu_run", "", "   ")
    with pytest.raises(UsageError, match="not defined in the remote kernel"):
        connected.run_line_magic("colab_pull", "never_defined_remotely")


def test_timeout_is_a_timeout_error_and_kernel_survives(connected, capsys):
    result = run(connected, "%%gpu_run --timeout 0.5\nimport time\nwhile True: time.sleep(0.01)")
    assert isinstance(result.error_in_exec, CellTimeoutError)
    assert isinstance(result.error_in_exec, TimeoutError)
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    connected.run_line_magic("gpu_run", "print('ok after timeout')")
    assert "ok after timeout" in capsys.readouterr().out


def test_status_table_and_json(connected, capsys):
    table = connected.run_line_magic("colab_status", "")
    text = repr(table)
    assert "default" in text
    assert "local" in text
    assert "mock" in text
    assert "<table>" in table._repr_html_()
    connected.run_line_magic("colab_status", "--json")
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["state"] == "idle"
    assert rows[0]["current"] == "*"


def test_named_sessions_kernels_disconnect_keep_and_attach(connected, capsys):
    ip = connected
    ip.run_line_magic("colab_connect", "--local --name second")
    ip.run_line_magic("gpu_run", "--on second where = 'second'")
    ip.run_line_magic("gpu_run", "--on default where = 'default'")
    ip.run_line_magic("colab_pull", "where --on second")
    assert ip.user_ns["where"] == "second"
    kid = registry.get("second").kernel_id
    ip.run_line_magic("colab_disconnect", "second --keep")
    capsys.readouterr()
    ip.run_line_magic("colab_kernels", "--local --json")
    listed = {k["id"]: k for k in json.loads(capsys.readouterr().out)}
    assert listed[kid]["state"] == "idle"
    ip.run_line_magic("colab_connect", f"--local --name second --attach {kid}")
    ip.run_line_magic("colab_pull", "where --on second")
    assert ip.user_ns["where"] == "second"
    ip.run_line_magic("colab_disconnect", "second")
    assert "second" not in registry.names()


def test_restart_gives_a_fresh_kernel(connected):
    connected.run_line_magic("gpu_run", "before_restart = 1")
    connected.run_line_magic("colab_connect", "--restart")
    result = run(connected, "%%gpu_run\n'before_restart' in dir()")
    assert repr(result.result) == "False"


def test_config_default_target(ip):
    from traitlets.config import Config

    magics = ip._colabmagic_magics
    magics.update_config(Config({"ColabMagics": {"default_target": "local"}}))
    try:
        ip.run_line_magic("colab_connect", "--name fromconfig")
        assert registry.get("fromconfig").transport.target == "local"
    finally:
        ip.run_line_magic("colab_disconnect", "fromconfig")
        magics.update_config(Config({"ColabMagics": {"default_target": ""}}))


def test_unload_ext_shuts_down_what_it_started(colabmagic_root):
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "colabmagic")
    shell.run_line_magic("colab_connect", "--local --name unloadme")
    kid = registry.get("unloadme").kernel_id
    shell.run_line_magic("unload_ext", "colabmagic")
    assert "unloadme" not in registry.names()
    transport = LocalTransport(root=str(colabmagic_root))
    wait_until(
        lambda: {k["id"]: k for k in transport.list_kernels()}[kid]["state"] == "stopped",
        timeout=10,
        what="the kernel to stop",
    )
    shell.run_line_magic("load_ext", "colabmagic")  # leave the module fixture's state usable
