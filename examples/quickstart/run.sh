#!/usr/bin/env bash
# Quickstart: teacher, a student without KD and the word-KD student best on valid, on
# Multi30k de-en on the CPU, through the benchmark harness (same commands, decoding and
# scoring as the recipes): BLEU, chrF, sentences/s and speed-up over the teacher.
# Usage: bash examples/quickstart/run.sh [--data FOLDER | --download] [--preset quickstart|tiny]
#        (any option of python -m kd_bench multi30k)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export KD_BENCH_LAUNCHER="bash examples/quickstart/run.sh"
exec python -m kd_bench multi30k --preset quickstart --rows baseline,word-kd,word-kd-js \
    --work-root "$here/work" --summary "$@"
