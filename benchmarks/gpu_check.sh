#!/usr/bin/env bash
# GPU check for the fingerprinting code (issue 6): run on any CUDA machine, < 5 minutes.
#   bash benchmarks/gpu_check.sh            # from the repository root, with colabmagic[gpu,test]
# 1. the CuPy tests (hashes, peaks and matches equal NumPy's, on the real device);
# 2. extraction throughput on decoded audio and 1,000 batched 10 s queries, NumPy vs CuPy, on
#    the same synthetic library (ratios in one run);
# 3. the Wesnoth benchmark on CuPy when the music package is installed (time permitting).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONUNBUFFERED=1
$PY - <<'PY'
import cupy
n = cupy.cuda.runtime.getDeviceCount()
assert n > 0, "no CUDA device"
print("GPU:", cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(), "| CuPy", cupy.__version__)
PY
cd tests
timeout 150 $PY -m pytest -c ../pyproject.toml --rootdir .. -m gpu -q -rs -p no:cacheprovider \
    fingerprint/test_fingerprinter.py fingerprint/test_match.py fingerprint/test_verify.py
cd ..
timeout 240 $PY - <<'PY'
import json
from colabmagic.fingerprint.bench import device_benchmark
for be, hours, nq in (("numpy", 1.0, 100), ("cupy", 10.0, 1000), ("cupy", 10.0, 1000)):
    r = device_benchmark(backend=be, hours=hours, n_queries=nq)
    print(f"{be:5s} extraction {r['extract_x_realtime']:>10,.0f}x realtime | {r['queries']} "
          f"queries of 10 s in {r['queries_seconds']:.2f} s (of which fingerprinting "
          f"{r['queries_fingerprint_seconds']:.2f} s; recall {r['query_recall']:.0%})")
    print(json.dumps(r))
PY
MUSIC=/usr/share/games/wesnoth/1.16/data/core/music
if [ -d "$MUSIC" ]; then
    timeout 150 $PY benchmarks/fingerprint.py --backend cupy --workers "$(nproc)" \
        --queries-per-track 1 --conditions clean,snr0,snr-5,speed1.05
fi
