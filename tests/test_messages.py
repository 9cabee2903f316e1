"""colabmagic.messages.recv: jupyter_client's checks, without its date parsing."""

import pytest
import zmq
from jupyter_client.session import Session as JupyterSession

from colabmagic import messages


@pytest.fixture
def pair():
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.bind("inproc://messages")
    b.connect("inproc://messages")
    yield a, b
    a.close(0)
    b.close(0)
    ctx.term()


def test_a_signed_message_is_read_with_its_dates_as_strings(pair):
    a, b = pair
    sender, reader = JupyterSession(key=b"k"), JupyterSession(key=b"k")
    assert messages.recv(reader, b) is None  # nothing there yet: no block, no error
    sent = sender.send(a, "stream", {"name": "stdout", "text": "hi"}, buffers=[b"raw"])
    got = messages.recv(reader, b)
    assert got["msg_id"] == sent["header"]["msg_id"]
    assert got["msg_type"] == "stream"
    assert got["content"] == {"name": "stdout", "text": "hi"}
    assert isinstance(got["header"]["date"], str)  # jupyter_client would parse it: we don't
    assert [bytes(x) for x in got["buffers"]] == [b"raw"]


def test_wrong_key_replay_and_malformed_are_refused(pair):
    a, b = pair
    reader = JupyterSession(key=b"k")
    JupyterSession(key=b"other").send(a, "stream", {"text": "x"})
    with pytest.raises(ValueError, match="Invalid Signature"):
        messages.recv(reader, b)
    frames = JupyterSession(key=b"k").serialize(JupyterSession(key=b"k").msg("stream", {}))
    a.send_multipart(frames)
    assert messages.recv(reader, b)["msg_type"] == "stream"
    a.send_multipart(frames)  # the same signed message again
    with pytest.raises(ValueError, match="Duplicate Signature"):
        messages.recv(reader, b)
    a.send_multipart([b"<IDS|MSG>", b"sig"])
    with pytest.raises(ValueError, match="malformed message"):
        messages.recv(reader, b)
