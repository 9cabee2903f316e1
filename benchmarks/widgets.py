"""Slider change -> remote callback -> output: latency via ``%%gpu_run`` against a direct kernel.

Run: ``python benchmarks/widgets.py [--n 200]``

Both sides are measured the way a notebook user meets them, in one run on this machine, with a
``jupyter_client`` ``BlockingKernelClient`` as the frontend:

- ``direct``: an ipykernel started by ``KernelManager`` creates an ``IntSlider`` whose ``observe``
  callback prints the new value; the frontend sends the ``comm_msg`` a dragged slider sends and
  times until the printed value arrives, then until the kernel is idle again (the reference);
- ``relayed``: a local ipykernel with ``%load_ext colabmagic`` and ``%colab_connect --local`` runs
  the same cell under ``%%gpu_run``: the change goes frontend -> local kernel -> proxy -> bridge ->
  agent -> remote kernel, and the callback's output comes back the same way.

Also times the cell that shows the slider (execute -> the widget's ``comm_open`` at the frontend).
Prints medians, the 90th percentile and the ratios, with the machine's load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
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


def run(n: int, *, relayed: bool) -> dict[str, list[float]]:
    km, kc = start_new_kernel(kernel_name="python3", startup_timeout=120)
    try:
        prefix = ""
        if relayed:
            reply = kc.execute_interactive(
                "%load_ext colabmagic\n%colab_connect --local",
                timeout=120,
                output_hook=lambda m: None,
            )
            assert reply["content"]["status"] == "ok", reply["content"]
            prefix = "%%gpu_run\n"
        return measure(kc, prefix, n)
    finally:
        kc.stop_channels()
        km.shutdown_kernel()


def _ms(samples: list[float], q: float = 0.5) -> float:
    if len(samples) == 1:
        return samples[0] * 1000
    return statistics.quantiles(samples, n=100)[int(q * 100) - 1] * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200, help="slider changes per side")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as root:
        os.environ["COLABMAGIC_ROOT"] = root
        direct = run(args.n, relayed=False)
        relayed = run(args.n, relayed=True)
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


if __name__ == "__main__":
    main()
