#!/usr/bin/env bash
# Multi30k: the Kim & Rush distillation table (teacher, KD students, BLEU, speed).
# Usage: bash examples/multi30k/run.sh [--preset cpu|gpu|tiny] [--src de --tgt en]
#        [--data FOLDER | --download] [--subword spm|bpe] [--from STAGE | --only STAGE]
# The harness is the kd_bench package: python -m kd_bench multi30k --help lists every option.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export KD_BENCH_LAUNCHER="bash examples/multi30k/run.sh"
exec python -m kd_bench multi30k --work-root "$here/work" "$@"
