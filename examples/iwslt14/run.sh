#!/usr/bin/env bash
# IWSLT'14 de-en: the Kim & Rush distillation table on a GPU machine with internet access.
# Usage: bash examples/iwslt14/run.sh [--dry-run] [--data FOLDER] [--subword spm|bpe]
#        [--from STAGE | --only STAGE] [--rows a,b] [--results DIR] [--list]
# The harness is the kd_bench package: python -m kd_bench iwslt14 --help lists every option.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export KD_BENCH_LAUNCHER="bash examples/iwslt14/run.sh"
exec python -m kd_bench iwslt14 --work-root "$here/work" "$@"
