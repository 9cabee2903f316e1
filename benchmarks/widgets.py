"""Slider change -> remote callback -> output: latency via ``%%gpu_run`` against a direct kernel.

Run: ``python benchmarks/widgets.py [--n 200] [--wan-delay 0.02]``

Both sides are measured the way a notebook user meets them, in one run on this machine, with a
``jupyter_client`` ``BlockingKernelClient`` as the frontend:

- ``direct``: an ipykernel started by ``KernelManager`` creates an ``IntSlider`` whose ``observe``
  callback prints the new value; the frontend sends the ``comm_msg`` a dragged slider sends and
  times until the printed value arrives, then until the kernel is idle again (the reference);
- ``relayed``: a local ipykernel with ``%load_ext colabmagic`` and ``%colab_connect --local`` runs
  the same cell under ``%%gpu_run``: the change goes frontend -> local kernel -> proxy -> bridge ->
  agent -> remote kernel, and the callback's output comes back the same way.

Also times the cell that shows the slider (execute -> the widget's ``comm_open`` at the frontend).

With ``--wan-delay S`` a third run goes over SSH to a private OpenSSH sshd on loopback through the
emulated WAN link (``colabmagic.testing_wan`` as ProxyCommand, S seconds each way): there the
reference is the round trip of a ``%%gpu_run pass`` cell over the same link, in the same kernel.
Prints medians, the 90th percentile and the ratios, with the machine's load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

from jupyter_client.manager import start_new_kernel

CELL = (
    "import ipywidgets as w\n"
    "s = w.IntSlider(value=0, max=1_000_000)\n"
    "s.observe(lambda ch: print('value', ch['new']), names='value')\n"
    "s"
)


def _until(kc, pred, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        msg = kc.get_iopub_msg(timeout=max(0.01, deadline - time.monotonic()))
        if pred(msg):
            return msg


def _idle_after(msg_id: str):
    return lambda m: (
        m["header"]["msg_type"] == "status"
        and m["parent_header"].get("msg_id") == msg_id
        and m["content"]["execution_state"] == "idle"
    )


def measure(kc, prefix: str, n: int) -> dict[str, list[float]]:
    """Show the slider (cell time), then *n* changes: time to the printed value and to idle."""
    warm = kc.execute(prefix + "import ipywidgets")  # both kernels have it imported
    _until(kc, _idle_after(warm))
    t = time.perf_counter()
    cell = kc.execute(prefix + CELL)
    opened = _until(
        kc,
        lambda m: (
            m["header"]["msg_type"] == "comm_open"
            and m["content"]["data"]["state"].get("_model_name") == "IntSliderModel"
        ),
    )
    shown = time.perf_counter() - t
    _until(kc, _idle_after(cell))
    comm_id = opened["content"]["comm_id"]
    out: dict[str, list[float]] = {"show": [shown], "output": [], "idle": []}
    for i in range(1, n + 11):
        data = {"method": "update", "state": {"value": i}, "buffer_paths": []}
        msg = kc.session.msg("comm_msg", {"comm_id": comm_id, "data": data})
        t = time.perf_counter()
        kc.shell_channel.send(msg)
        text = []  # print() may arrive in more than one stream message

        def printed(m, want=f"value {i}\n", parent=msg["header"]["msg_id"], text=text):
            if m["header"]["msg_type"] == "stream" and m["parent_header"].get("msg_id") == parent:
                text.append(m["content"]["text"])
            return want in "".join(text)

        _until(kc, printed)
        t_out = time.perf_counter() - t
        _until(kc, _idle_after(msg["header"]["msg_id"]))
        if i > 10:  # the first ten warm up both kernels
            out["output"].append(t_out)
            out["idle"].append(time.perf_counter() - t)
    return out


def cells(kc, n: int) -> list[float]:
    """Round trips of a ``%%gpu_run pass`` cell (execute -> idle) from the frontend."""
    out = []
    for _ in range(n):
        t = time.perf_counter()
        _until(kc, _idle_after(kc.execute("%%gpu_run\npass")))
        out.append(time.perf_counter() - t)
    return out


def run(n: int, *, connect: str | None) -> dict[str, list[float]]:
    """Measure on a direct kernel (*connect* None) or one that ran the *connect* code first."""
    km, kc = start_new_kernel(kernel_name="python3", startup_timeout=120)
    try:
        prefix = ""
        if connect is not None:
            reply = kc.execute_interactive(
                "%load_ext colabmagic\n" + connect, timeout=120, output_hook=lambda m: None
            )
            assert reply["content"]["status"] == "ok", reply["content"]
            prefix = "%%gpu_run\n"
        out = measure(kc, prefix, n)
        if connect is not None:
            out["cell"] = cells(kc, max(20, n // 4))
        return out
    finally:
        kc.stop_channels()
        km.shutdown_kernel()


def over_wan(n: int, delay: float, root: str) -> dict[str, list[float]]:
    from colabmagic.testing_sshd import SSHServer

    with SSHServer("box") as srv:
        relay = f"{sys.executable} -m colabmagic.testing_wan --delay {delay} 127.0.0.1 {srv.port}"
        connect = (
            "import colabmagic, sys\n"
            f"colabmagic.connect('box', ssh_config={srv.ssh_config!r}, python=sys.executable, "
            f"root={root!r}, proxy_command={relay!r})"
        )
        return run(n, connect=connect)


def _ms(samples: list[float], q: float = 0.5) -> float:
    if len(samples) == 1:
        return samples[0] * 1000
    return statistics.quantiles(samples, n=100)[int(q * 100) - 1] * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200, help="slider changes per side")
    p.add_argument("--wan-delay", type=float, default=0.0, help="also over SSH + emulated WAN")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as root:
        os.environ["COLABMAGIC_ROOT"] = root
        direct = run(args.n, connect=None)
        relayed = run(args.n, connect="%colab_connect --local")
        wan = over_wan(args.n, args.wan_delay, root) if args.wan_delay else None
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"slider change -> callback output at the frontend, {args.n} changes:")
    for key, what in (("output", "printed value arrives"), ("idle", "kernel idle again")):
        d50, r50 = _ms(direct[key]), _ms(relayed[key])
        d90, r90 = _ms(direct[key], 0.9), _ms(relayed[key], 0.9)
        print(f"  {what}:")
        print(f"    direct kernel        median {d50:7.2f} ms   p90 {d90:7.2f} ms")
        print(
            f"    %%gpu_run (relayed)  median {r50:7.2f} ms   p90 {r90:7.2f} ms   "
            f"ratio {r50 / d50:.2f}x, +{r50 - d50:.2f} ms"
        )
    d, r = _ms(direct["show"]), _ms(relayed["show"])
    print(
        "cell showing a slider -> its comm_open at the frontend (one sample, ipywidgets imported):"
    )
    print(f"    direct {d:.1f} ms, %%gpu_run {r:.1f} ms")
    print(f"%%gpu_run pass cell round trip (local link): median {_ms(relayed['cell']):.2f} ms")
    if wan is not None:
        c50, o50, i50 = _ms(wan["cell"]), _ms(wan["output"]), _ms(wan["idle"])
        print(f"over SSH through the emulated WAN ({args.wan_delay * 1000:g} ms each way):")
        print(f"    %%gpu_run pass cell round trip   median {c50:7.2f} ms (the reference)")
        print(f"    slider -> printed value          median {o50:7.2f} ms   ratio {o50 / c50:.2f}x")
        print(f"    slider -> kernel idle again      median {i50:7.2f} ms   ratio {i50 / c50:.2f}x")


if __name__ == "__main__":
    main()
