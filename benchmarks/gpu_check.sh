#!/usr/bin/env bash
# GPU check for the fingerprinting code (issues 6 and 14): run on any CUDA machine, < 5 minutes.
#   bash benchmarks/gpu_check.sh            # from the repository root, with colabmagic[gpu,test]
#   FP_CORPUS=~/fpcorpus bash benchmarks/gpu_check.sh     # scale step on a corpus.py corpus
# 1. the CuPy tests (hashes, peaks and matches equal NumPy's, on the real device);
# 2. extraction throughput on decoded audio and 1,000 batched 10 s queries, NumPy vs CuPy, on
#    the same synthetic library (ratios in one run);
# 3. the scale benchmark (benchmarks/fingerprint_scale.py) on CuPy: `fp index --backend cupy`
#    from process start and the 1,300 queries batched through match_many (plus the same queries
#    through `fp query`). On $FP_CORPUS when set; otherwise on a 1,000-file corpus that
#    benchmarks/corpus.py builds here from synthetic tracks (needs ffmpeg; the Debian music is
#    not on a GPU machine without network);
# 4. the Wesnoth benchmark on CuPy when the music package is installed (time permitting).
# Without CuPy or a CUDA device it says so and exits 0 (nothing to check here).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONUNBUFFERED=1
if ! $PY - <<'PY'
import sys
try:
    import cupy
    n = cupy.cuda.runtime.getDeviceCount()
except Exception as exc:  # no CuPy, no driver, no device
    print(f"gpu_check: skipped, no CUDA device here ({type(exc).__name__}: {exc})")
    sys.exit(1)
if n < 1:
    print("gpu_check: skipped, no CUDA device here")
    sys.exit(1)
print("GPU:", cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(), "| CuPy", cupy.__version__)
PY
then
    exit 0
fi
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
CORPUS=${FP_CORPUS:-}
if [ -z "$CORPUS" ] && command -v ffmpeg >/dev/null; then
    CORPUS=$(mktemp -d /tmp/fpgpu-corpus-XXXXXX)
    timeout 60 $PY - "$CORPUS/sources" <<'PY'
import sys
from pathlib import Path
import soundfile
from colabmagic.fingerprint.bench import synthetic_library
out = Path(sys.argv[1]); out.mkdir(parents=True)
for i, y in enumerate(synthetic_library(120, 45.0, seed=14)):  # 120 distinct 45 s tracks
    soundfile.write(out / f"track{i:03d}.wav", y, 8000, subtype="PCM_16")
PY
    timeout 120 $PY benchmarks/corpus.py --out "$CORPUS" --source "$CORPUS/sources" \
        --files 1000 --workers "$(nproc)" --no-relations  # distinct by construction
fi
if [ -n "$CORPUS" ] && [ -f "$CORPUS/manifest.json" ]; then
    timeout 200 $PY benchmarks/fingerprint_scale.py --corpus "$CORPUS" --backend cupy \
        --workers "$(nproc)" --skip-dedup --decode-once --batched-only \
        --json "$CORPUS/scale-cupy.json"
else
    echo "gpu_check: scale step skipped (no corpus: set FP_CORPUS, or install ffmpeg)"
fi
MUSIC=/usr/share/games/wesnoth/1.16/data/core/music
if [ -d "$MUSIC" ]; then
    timeout 150 $PY benchmarks/fingerprint.py --backend cupy --workers "$(nproc)" \
        --queries-per-track 1 --conditions clean,snr0,snr-5,speed1.05
fi
