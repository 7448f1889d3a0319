#!/usr/bin/env bash
# One prepared GPU check (tests + timings) for a lent GPU machine: run from the repository root as
#     bash bench/gpu_check.sh [OUTDIR]
#     bash bench/gpu_check.sh --dry-run [OUTDIR]   # no GPU: the benchmark's tiny CPU form under the
#                                                  # Triton interpreter, the fla peer included
# (bench/gpu_check.sh hands its arguments to this file, bench/perf/gpu_check.sh.) It runs the Triton
# kernel tests on the GPU (bf16 included; one fixed kernel config, so the time goes to testing rather
# than autotuning), then the forward and forward+backward timings of bench/perf/gpu.py, then packed
# against padded variable-length sequences (bench/report/varlen.py), then the report in its --full GPU
# mode, each step under its own time limit (TEST_LIMIT per test file,
# BENCH_LIMIT, VARLEN_LIMIT, REPORT_LIMIT seconds; 5 x 40 + 120 + 45 + 75 s by default, under eight
# minutes), and writes logs, tables and the report to OUTDIR.
# The fla peer comes from the fla-core wheel in ../shared/wheels (pure Python; the GPU image has torch,
# triton and einops), installed into /tmp/site, which goes on PYTHONPATH; without it the fla rows are
# skipped and the table says why.
set -u
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUTDIR=${1:-${OUT:-bench/results/gpu-check}}
mkdir -p "$OUTDIR"
PY=${PY:-python3}
timeout 60 $PY -m pip install -q --no-index --no-deps --target /tmp/site ../shared/wheels/*.whl 2>&1 | tail -n 3
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1 SPECTRAFORMER_FUSED_NO_CPU_EXT=1
if [ "$DRY" = 1 ]; then
  TRITON_INTERPRET=1 timeout "${BENCH_LIMIT:-600}" $PY -m bench.perf.gpu --dry-run --out "$OUTDIR/gpu_bench_dry.md" \
    2>&1 | tee "$OUTDIR/bench.log" | tail -n 40
  TRITON_INTERPRET=1 timeout "${VARLEN_LIMIT:-300}" $PY -m bench.report.varlen --dry-run --out "$OUTDIR/varlen_dry.md" \
    2>&1 | tee -a "$OUTDIR/bench.log" | tail -n 20
  exit 0
fi
{
  date -u +"date: %Y-%m-%d %H:%M UTC"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '|', torch.cuda.get_device_name())"
} 2>&1 | tee "$OUTDIR/env.txt"
# Each test file gets its own limit (every new kernel specialisation compiles first), so a slow file
# cannot starve the others; the log shows how far each got.
for f in ${GPU_TESTS:-tests/test_triton_fwd.py tests/test_triton_bwd.py tests/test_triton_chunk.py tests/test_triton_limits.py tests/test_triton_sinks.py}; do
  echo "== $f" | tee -a "$OUTDIR/tests.log"
  SPECTRAFORMER_FUSED_AUTOTUNE=0 timeout "${TEST_LIMIT:-40}" $PY -m pytest -q -p no:cacheprovider "$f" \
    2>&1 | tee -a "$OUTDIR/tests.log" | tail -n 12
done
# Fixed kernel configs unless BENCH_AUTOTUNE=1: autotuning compiles every candidate config first,
# which does not fit the time of one check; the table's header says which was timed.
SPECTRAFORMER_FUSED_AUTOTUNE=${BENCH_AUTOTUNE:-0} timeout "${BENCH_LIMIT:-120}" $PY -m bench.perf.gpu --dtypes "${BENCH_DTYPES:-fp16}" --rep "${BENCH_REP:-30}" \
  --out "$OUTDIR/gpu_bench.md" 2>&1 | tee "$OUTDIR/bench.log" | tail -n 40
SPECTRAFORMER_FUSED_AUTOTUNE=${BENCH_AUTOTUNE:-0} timeout "${VARLEN_LIMIT:-45}" $PY -m bench.report.varlen --full --device cuda \
  --out "$OUTDIR/varlen.md" 2>&1 | tee -a "$OUTDIR/bench.log" | tail -n 25
timeout "${REPORT_LIMIT:-75}" $PY -m bench.report --full --device cuda --out "$OUTDIR/report" \
  2>&1 | tee "$OUTDIR/report.log" | tail -n 30
# The device tool brings back at most 8 files: pack the report folder into one archive.
[ -d "$OUTDIR/report" ] && tar -czf "$OUTDIR/report.tgz" -C "$OUTDIR" report && rm -rf "$OUTDIR/report"
exit 0
