#!/usr/bin/env bash
# The one GPU check of issue 28 (item 4), from the repository root on a CUDA machine:
#   bash benchmarks/bench_gpu.sh [DATA_ROOT]   (default ../shared/data; demo data where absent)
# Installs patchad only (pip install -e .; where that cannot run offline, src/ is used as is)
# and writes $OUT/gpu.md (bench_gpu.py, at most ~6 min) and $OUT/test_devices.txt (the device
# tests, whose CUDA tests run here instead of skipping). About 8 minutes at most in all.
set -u
OUT="${OUT:-benchmarks/results}"; mkdir -p "$OUT"; export PYTHONPATH=src
timeout 60 pip install -q -e . >"$OUT/pip.txt" 2>&1 || echo "pip install -e . failed (see pip.txt); running from src/"
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())' | tee "$OUT/torch.txt"
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_devices.py -rs >"$OUT/test_devices.txt" 2>&1; echo "device tests rc=$?"; tail -3 "$OUT/test_devices.txt"
timeout 360 python3 benchmarks/bench_gpu.py --data "${1:-../shared/data}" --out "$OUT/gpu.md"; echo "bench rc=$?"
