"""The relay publishes remote bundles unchanged, except widget views it cannot back."""

from __future__ import annotations

from IPython.core.interactiveshell import InteractiveShell

from colabmagic.relay import WIDGET_MIME, Relay


def test_display_bundle_reaches_the_display_publisher_unchanged(monkeypatch):
    shell = InteractiveShell.instance()
    seen = []
    monkeypatch.setattr(shell.display_pub, "publish", lambda **kw: seen.append(kw))
    data = {"text/html": "<b>x</b>", "text/plain": "x", "image/png": "iVBOR"}
    Relay().display(data, {"image/png": {"width": 3}}, {"display_id": "d1"}, update=True)
    assert seen == [
        {
            "data": data,
            "metadata": {"image/png": {"width": 3}},
            "transient": {"display_id": "d1"},
            "update": True,
        }
    ]


def test_widget_views_fall_back_to_text(monkeypatch):
    shell = InteractiveShell.instance()
    seen = []
    monkeypatch.setattr(shell.display_pub, "publish", lambda **kw: seen.append(kw["data"]))
    Relay().display({WIDGET_MIME: {"model_id": "abc"}, "text/plain": "IntSlider(value=3)"}, {}, {})
    Relay().display({WIDGET_MIME: {"model_id": "abc"}}, {}, {})
    assert seen == [{"text/plain": "IntSlider(value=3)"}]
