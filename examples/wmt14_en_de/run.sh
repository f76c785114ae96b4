#!/usr/bin/env bash
# WMT'14 en-de: the Kim & Rush distillation table on a GPU machine with internet access.
# Usage: bash examples/wmt14_en_de/run.sh [--dry-run] [--data FOLDER] [--subword spm|bpe]
#        [--from STAGE | --only STAGE] [--rows a,b] [--results DIR] [--list]
# The harness is the kd_bench package: python -m kd_bench wmt14_en_de --help lists every option.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export KD_BENCH_LAUNCHER="bash examples/wmt14_en_de/run.sh"
exec python -m kd_bench wmt14_en_de --work-root "$here/work" "$@"
