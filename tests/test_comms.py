"""Widgets across ``%%gpu_run``: the real path, end to end.

A ``jupyter_client`` ``BlockingKernelClient`` plays the frontend. It talks to a real local
ipykernel that ran ``%load_ext colabmagic`` and ``%colab_connect --local``, so every remote comm
message crosses the whole link (proxy -> bridge process -> agent -> remote kernel) twice. Each
test drops that link in the middle (``Proxy.drop_link()``, or by killing the bridge process while
a cell runs) and checks that nothing was lost.
"""

from __future__ import annotations

import os
import signal
import time
import uuid

import numpy as np
import pytest
from jupyter_client.manager import start_new_kernel

from colabmagic import comms
from colabmagic.relay import WIDGET_MIME
from colabmagic.testing import wait_until
from colabmagic.transport.local import LocalTransport

pytestmark = pytest.mark.timeout(240)


class Frontend:
    """A frontend on a local kernel: runs cells, sends comm messages, keeps every IOPub message."""

    def __init__(self, kc):
        self.kc = kc
        self.log: list[dict] = []

    def _next(self, deadline: float) -> dict:
        left = deadline - time.monotonic()
        assert left > 0, "timed out waiting for the kernel"
        msg = self.kc.get_iopub_msg(timeout=left)
        self.log.append(msg)
        return msg

    def until_idle(self, msg_id: str, *, timeout: float = 60.0) -> list[dict]:
        """The IOPub messages up to the local kernel's idle after *msg_id* (all parents)."""
        deadline = time.monotonic() + timeout
        out = []
        while True:
            msg = self._next(deadline)
            out.append(msg)
            if (
                msg["header"]["msg_type"] == "status"
                and msg["parent_header"].get("msg_id") == msg_id
                and msg["content"]["execution_state"] == "idle"
            ):
                return out

    def wait_for(self, pred, *, timeout: float = 30.0, seen: bool = False) -> dict:
        """The next message matching *pred* (with *seen*: or one already received)."""
        for msg in self.log if seen else ():
            if pred(msg):
                return msg
        deadline = time.monotonic() + timeout
        while True:
            msg = self._next(deadline)
            if pred(msg):
                return msg

    def run(self, code: str, *, timeout: float = 60.0) -> list[dict]:
        msg_id = self.kc.execute(code, stop_on_error=False)
        msgs = self.until_idle(msg_id, timeout=timeout)
        reply = self.kc.get_shell_msg(timeout=timeout)
        while reply["parent_header"].get("msg_id") != msg_id:
            reply = self.kc.get_shell_msg(timeout=timeout)
        assert reply["content"]["status"] == "ok", (reply["content"], stdout(msgs))
        return msgs

    def send(self, msg_type: str, content: dict, buffers=None) -> str:
        msg = self.kc.session.msg(msg_type, content)
        self.kc.shell_channel.send(msg) if not buffers else self.kc.session.send(
            self.kc.shell_channel.socket, msg, buffers=buffers
        )
        return msg["header"]["msg_id"]

    def set_state(self, comm_id: str, **state) -> str:
        data = {"method": "update", "state": state, "buffer_paths": []}
        return self.send("comm_msg", {"comm_id": comm_id, "data": data})

    def drop_link(self) -> int:
        """Drop the colabmagic link of the local kernel; returns its reconnect count before."""
        before = int(self.local("registry.get().proxy.reconnects"))
        self.run("from colabmagic.session import registry\nregistry.get().proxy.drop_link()")
        return before

    def local(self, expr: str) -> str:
        """Evaluate *expr* in the local kernel (not remotely); its printed value."""
        msgs = self.run(f"from colabmagic.session import registry\nprint({expr})")
        return stdout(msgs).strip()

    def reconnected_since(self, before: int) -> None:
        assert int(self.local("registry.get().proxy.reconnects")) > before


def live_agents() -> set[str]:
    return {k["id"] for k in LocalTransport().list_kernels() if k["state"] != "stopped"}


def stdout(msgs: list[dict]) -> str:
    return "".join(
        m["content"]["text"]
        for m in msgs
        if m["header"]["msg_type"] == "stream" and m["content"]["name"] == "stdout"
    )


def opened(msgs: list[dict], model: str) -> list[dict]:
    """The comm_open messages of widget models named *model* (``IntSliderModel``...)."""
    return [
        m
        for m in msgs
        if m["header"]["msg_type"] == "comm_open"
        and m["content"]["data"].get("state", {}).get("_model_name") == model
    ]


def updates(msgs: list[dict], comm_id: str) -> list[dict]:
    return [
        m["content"]["data"]["state"]
        for m in msgs
        if m["header"]["msg_type"] == "comm_msg"
        and m["content"]["comm_id"] == comm_id
        and "state" in m["content"]["data"]
    ]


@pytest.fixture(scope="module")
def fe():
    """A local ipykernel with colabmagic connected to a --local remote kernel."""
    before = live_agents()
    km, kc = start_new_kernel(kernel_name="python3", startup_timeout=120)
    try:
        front = Frontend(kc)
        out = stdout(front.run("%load_ext colabmagic\n%colab_connect --local", timeout=120))
        assert "connected: session 'default'" in out
        yield front
        # stop the remote kernels here, not in the local kernel's atexit, which its shutdown
        # may cut short
        front.run("from colabmagic.session import registry\nregistry.close_all()")
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)
    wait_until(lambda: live_agents() <= before, timeout=60, what="the remote kernels to stop")


def test_slider_state_value_and_a_link_drop(fe):
    msgs = fe.run("%%gpu_run\nimport ipywidgets as w\ns = w.IntSlider(value=3)\ns")
    (open_,) = opened(msgs, "IntSliderModel")
    comm_id = open_["content"]["comm_id"]
    assert open_["content"]["target_name"] == "jupyter.widget"
    assert open_["content"]["data"]["state"]["value"] == 3
    assert open_["metadata"]["version"].startswith("2.")
    # the widget view (Out[n]) comes after the model it shows, in the cell that made it
    (result,) = [m for m in msgs if m["header"]["msg_type"] == "execute_result"]
    assert result["content"]["data"][WIDGET_MIME]["model_id"] == comm_id
    assert msgs.index(open_) < msgs.index(result)
    assert open_["parent_header"]["msg_id"] == result["parent_header"]["msg_id"]

    # the local comm manager knows the mirrored id (a frontend asks with comm_info)
    info = fe.kc.comm_info(target_name="jupyter.widget")
    reply = fe.kc.get_shell_msg(timeout=30)
    while reply["parent_header"].get("msg_id") != info:
        reply = fe.kc.get_shell_msg(timeout=30)
    assert reply["content"]["comms"][comm_id] == {"target_name": "jupyter.widget"}

    before = fe.drop_link()
    sent = fe.set_state(comm_id, value=7)
    echo = [m for m in fe.until_idle(sent) if m["header"]["msg_type"] == "comm_msg"]
    assert echo  # ipywidgets 8 echoes a frontend change back
    assert all(m["parent_header"]["msg_id"] == sent for m in echo)
    assert stdout(fe.run("%%gpu_run\nprint(s.value)")) == "7\n"
    fe.reconnected_since(before)

    # a widget keeps working after other cells ran; a burst of changes (a drag) ends in order
    fe.run("%%gpu_run\nx = 1")
    sent = [fe.set_state(comm_id, value=v) for v in (8, 2, 9)]
    fe.until_idle(sent[-1])
    assert stdout(fe.run("%%gpu_run\nprint(s.value)")) == "9\n"
    msgs = fe.run("%%gpu_run\ns.close()")
    assert any(
        m["header"]["msg_type"] == "comm_close" and m["content"]["comm_id"] == comm_id for m in msgs
    )


def test_interact_output_arrives_under_its_widget_after_the_cell(fe):
    msgs = fe.run(
        "%%gpu_run\nfrom ipywidgets import interact\n"
        "@interact(x=5)\ndef f(x):\n    print('x is', x * 2)"
    )
    (slider,) = opened(msgs, "IntSliderModel")
    (out,) = opened(msgs, "OutputModel")
    out_id = out["content"]["comm_id"]
    cell = slider["parent_header"]["msg_id"]
    # during the cell, the Output widget captures the *local* cell's output
    assert cell in [s.get("msg_id") for s in updates(msgs, out_id)]
    assert "x is 10" in stdout(msgs)

    before = fe.drop_link()
    sent = fe.set_state(slider["content"]["comm_id"], value=6)
    msgs = fe.until_idle(sent)
    captured = [s["msg_id"] for s in updates(msgs, out_id) if "msg_id" in s]
    assert captured[0] == sent  # the Output widget names the frontend's own message...
    streams = [m for m in msgs if m["header"]["msg_type"] == "stream"]
    assert [m["content"]["text"] for m in streams] == ["x is 12\n"]
    assert streams[0]["parent_header"]["msg_id"] == sent  # ...and the output carries it
    first_capture = next(
        i
        for i, m in enumerate(msgs)
        if m["header"]["msg_type"] == "comm_msg"
        and m["content"]["data"].get("state", {}).get("msg_id") == sent
    )
    assert first_capture < msgs.index(streams[0])
    fe.reconnected_since(before)


def test_tqdm_notebook_bar_updates_survive_a_killed_bridge(fe):
    bridge_pid = int(fe.local("registry.get().transport.bridges[-1].pid"))
    msg_id = fe.kc.execute(
        "%%gpu_run\nfrom tqdm.notebook import tqdm\nimport time\n"
        "for i in tqdm(range(40), mininterval=0):\n    time.sleep(0.02)",
        stop_on_error=False,
    )
    # kill the link's bridge process as soon as the bar moves
    first = fe.wait_for(
        lambda m: (
            m["header"]["msg_type"] == "comm_msg"
            and "value" in m["content"]["data"].get("state", {})
        )
    )
    os.kill(bridge_pid, signal.SIGKILL)
    msgs = [first, *fe.until_idle(msg_id)]
    (bar,) = opened(fe.log, "FloatProgressModel")[-1:]
    bar_id = bar["content"]["comm_id"]
    values = [s["value"] for s in updates(msgs, bar_id) if "value" in s]
    assert values[-1] == 40
    assert values == sorted(values)
    assert len(values) >= 5
    assert "success" in [s.get("bar_style") for s in updates(msgs, bar_id)]
    assert not [m for m in msgs if m["header"]["msg_type"] == "error"]
    assert int(fe.local("registry.get().transport.bridges[-1].pid")) != bridge_pid


def test_binary_buffers_round_trip_both_ways(fe):
    fe.run(
        "%%gpu_run\nimport numpy as np\nfrom comm import create_comm\n"
        "def echo(msg):\n"
        "    arr = np.frombuffer(msg['buffers'][0], dtype=np.float64)\n"
        "    c.send({'sum': float(arr.sum())}, buffers=[arr[::-1].tobytes()])\n"
        "c = create_comm(target_name='cm.test.buffers', data={'n': 3},\n"
        "                buffers=[np.arange(3, dtype=np.float64).tobytes()])\n"
        "c.on_msg(echo)"
    )
    (open_,) = [
        m
        for m in fe.log
        if m["header"]["msg_type"] == "comm_open"
        and m["content"]["target_name"] == "cm.test.buffers"
    ]
    assert np.frombuffer(open_["buffers"][0], dtype=np.float64).tolist() == [0.0, 1.0, 2.0]
    before = fe.drop_link()
    arr = np.random.default_rng(0).random(1 << 17)  # 1 MiB
    sent = fe.send(
        "comm_msg", {"comm_id": open_["content"]["comm_id"], "data": {}}, [arr.tobytes()]
    )
    (reply,) = [m for m in fe.until_idle(sent) if m["header"]["msg_type"] == "comm_msg"]
    assert reply["content"]["data"]["sum"] == pytest.approx(arr.sum())
    assert np.frombuffer(reply["buffers"][0], dtype=np.float64).tolist() == arr[::-1].tolist()
    fe.reconnected_since(before)


def test_frontend_opened_comms_and_other_targets(fe):
    # a target registered remotely (bokeh- or server-proxy-style): announced after the cell
    fe.run(
        "%%gpu_run\ndef opened(comm, msg):\n"
        "    comm.send({'hello': msg['content']['data']['name']})\n"
        "    comm.on_msg(lambda m: comm.send({'echo': m['content']['data']}))\n"
        "get_ipython().kernel.comm_manager.register_target('cm.test.echo', opened)"
    )
    before = fe.drop_link()
    comm_id = uuid.uuid4().hex
    sent = fe.send("comm_open", {"comm_id": comm_id, "target_name": "cm.test.echo",
                                 "data": {"name": "lab"}})  # fmt: skip
    (hello,) = [m for m in fe.until_idle(sent) if m["header"]["msg_type"] == "comm_msg"]
    assert hello["content"] == {"comm_id": comm_id, "data": {"hello": "lab"}}
    sent = fe.send("comm_msg", {"comm_id": comm_id, "data": {"n": 1}})
    (echo,) = [m for m in fe.until_idle(sent) if m["header"]["msg_type"] == "comm_msg"]
    assert echo["content"]["data"] == {"echo": {"n": 1}}
    fe.reconnected_since(before)

    # a target nobody has, and colabmagic's own: the reply of a kernel without the target
    for target in ("cm.test.nothing", "colabmagic"):
        other = uuid.uuid4().hex
        sent = fe.send("comm_open", {"comm_id": other, "target_name": target, "data": {}})
        closes = [m for m in fe.until_idle(sent) if m["header"]["msg_type"] == "comm_close"]
        assert [m["content"]["comm_id"] for m in closes] == [other], target

    # colabmagic's own comm traffic (push/pull, debug) never reaches the frontend
    msgs = fe.run("y = 41\n%colab_push y\n%gpu_run --pull z z = y + 1\nprint(z)")
    assert stdout(msgs) == "42\n"
    assert not [m for m in msgs if m["header"]["msg_type"].startswith("comm_")]


def test_ipywidgets_version_skew_is_named_once(fe, tmp_path):
    # stand-in: a remote kernel whose cwd holds ipywidgets 7 metadata (sys.path starts at cwd)
    dist = tmp_path / "ipywidgets-7.8.5.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ipywidgets\nVersion: 7.8.5\n")
    fe.run(f"%colab_connect --local --name skew --cwd {tmp_path}")
    try:
        first = stdout(fe.run("%%gpu_run --on skew\nprint('cell')"))
        lines = first.splitlines()
        assert lines[0] == "cell"
        (note,) = lines[1:]
        local = fe.local("__import__('importlib.metadata').metadata.version('ipywidgets')")
        assert "7.8.5" in note
        assert local in note
        assert f'%pip install "ipywidgets=={local.split(".")[0]}.*"' in note
        assert stdout(fe.run("%%gpu_run --on skew\nprint('again')")) == "again\n"
    finally:
        fe.run("%colab_disconnect skew")


def test_skew_message_only_for_different_majors():
    assert comms.skew_message("8.1.2", "8.0.0") is None
    assert comms.skew_message(None, "8.1.0") is None
    msg = comms.skew_message("7.8.5", "8.1.9")
    assert msg.startswith("the remote kernel has ipywidgets 7.8.5")
    assert '%pip install "ipywidgets==8.*"' in msg
    assert "\n" not in msg


def test_terminal_ipython_shows_text_and_says_so_once(capsys):
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "colabmagic")
    shell.run_line_magic("colab_connect", "--local --name term")
    try:
        capsys.readouterr()
        code = "import ipywidgets as w\ndisplay(w.IntSlider(value=4))"
        shell.run_cell_magic("gpu_run", "--on term", code)
        out = capsys.readouterr().out
        assert "IntSlider(value=4)" in out
        assert out.count("widgets show as text here") == 1
        shell.run_cell_magic("gpu_run", "--on term", code)
        assert "widgets show as text here" not in capsys.readouterr().out
    finally:
        shell.run_line_magic("colab_disconnect", "term")


def test_restart_and_disconnect_close_the_widgets(fe):
    fe.run("%colab_connect --local --name rs")
    try:
        (old,) = opened(fe.run("%%gpu_run --on rs\nimport ipywidgets as w\nw.IntSlider()"),
                        "IntSliderModel")  # fmt: skip
        fe.run("%colab_connect --name rs --restart")
        fe.wait_for(
            lambda m: (
                m["header"]["msg_type"] == "comm_close"
                and m["content"]["comm_id"] == old["content"]["comm_id"]
            ),
            seen=True,
        )
        # the fresh kernel is set up again: tqdm bars are widgets there too
        msgs = fe.run(
            "%%gpu_run --on rs\nfrom tqdm.auto import tqdm\nfor _ in tqdm(range(3)): pass"
        )
        assert opened(msgs, "FloatProgressModel")
        (last,) = opened(fe.run("%%gpu_run --on rs\nw = __import__('ipywidgets').IntSlider()\nw"),
                         "IntSliderModel")  # fmt: skip
    finally:
        fe.run("%colab_disconnect rs")
    fe.wait_for(
        lambda m: (
            m["header"]["msg_type"] == "comm_close"
            and m["content"]["comm_id"] == last["content"]["comm_id"]
        ),
        seen=True,
    )


def test_plotly_figure_widget_and_its_later_updates(fe):
    msgs = fe.run(
        "%%gpu_run\nimport plotly.graph_objects as go\n"
        "fig = go.FigureWidget(data=[go.Bar(y=[1, 3, 2])])\nfig"
    )
    (open_,) = [m for m in msgs if m["header"]["msg_type"] == "comm_open"]
    (result,) = [m for m in msgs if m["header"]["msg_type"] == "execute_result"]
    assert result["content"]["data"][WIDGET_MIME]["model_id"] == open_["content"]["comm_id"]
    state = open_["content"]["data"]["state"]
    assert "_esm" in state  # an anywidget: its front-end code travels in the state
    fe.drop_link()
    msgs = fe.run("%%gpu_run\nfig.data[0].y = [4, 5, 6]")
    sent = [m for m in msgs if m["header"]["msg_type"] == "comm_msg"]
    assert sent
    assert all(m["content"]["comm_id"] == open_["content"]["comm_id"] for m in sent)
    assert "[4, 5, 6]" in str([m["content"]["data"] for m in sent]).replace(".0", "")


OLD_HELPER = """
import _colabmagic_kernel as k
_new = k._handle
def _old(comm, msg):  # stand-in for a kernel started by a colabmagic without widgets
    data = msg['content']['data']
    if data.get('op') == 'widgets':
        comm.send({'op': 'error', 'req': data['req'], 'message': "unknown operation 'widgets'"})
    else:
        _new(comm, msg)
k._handle = _old
"""


def test_a_kernel_with_an_older_helper_shows_text_and_says_why(fe):
    fe.run("%colab_connect --local --name old")
    try:
        fe.run(
            "from colabmagic.relay import QuietRelay\n"
            f"registry.get('old').run({OLD_HELPER!r}, relay=QuietRelay())"
        )
        msgs = fe.run("%%gpu_run --on old\nimport ipywidgets as w\ndisplay(w.IntSlider(value=5))")
        assert not [m for m in msgs if m["header"]["msg_type"].startswith("comm_")]
        (shown,) = [m for m in msgs if m["header"]["msg_type"] == "display_data"]
        assert shown["content"]["data"] == {"text/plain": "IntSlider(value=5)"}
        (note,) = stdout(msgs).splitlines()
        assert "older than this one" in note
        assert "%colab_connect --name old --restart" in note
        msgs = fe.run("%%gpu_run --on old\nprint(1)")
        assert stdout(msgs) == "1\n"
    finally:
        fe.run("%colab_disconnect old")


def test_a_thread_updates_its_widget_after_the_cell_ended(fe):
    msgs = fe.run(
        "%%gpu_run\nimport threading, time, ipywidgets as w\n"
        "p = w.IntProgress(max=3)\ndisplay(p)\ngo = threading.Event()\n"
        "def bump():\n    go.wait()\n    for i in range(1, 4):\n"
        "        time.sleep(0.02)\n        p.value = i\n"
        "threading.Thread(target=bump).start()"
    )
    (bar,) = opened(msgs, "IntProgressModel")
    cell = bar["parent_header"]
    before = fe.drop_link()
    go = fe.run("%%gpu_run\ngo.set()")[0]["parent_header"]  # updates may outlive this cell too
    last = fe.wait_for(
        lambda m: (
            m["header"]["msg_type"] == "comm_msg"
            and m["content"]["comm_id"] == bar["content"]["comm_id"]
            and m["content"]["data"].get("state", {}).get("value") == 3
        ),
        seen=True,
    )
    values = [s["value"] for s in updates(fe.log, bar["content"]["comm_id"]) if "value" in s]
    assert values == [1, 2, 3]
    # under the cell that made the bar, or the one running when the thread spoke
    assert last["parent_header"]["msg_id"] in (cell["msg_id"], go["msg_id"])
    fe.reconnected_since(before)
