#!/usr/bin/env bash
# Multi30k: the Kim & Rush distillation table (teacher, KD students, BLEU, speed).
# Usage: bash examples/multi30k/run.sh [--preset cpu|gpu|tiny] [--src de --tgt en]
#        [--data FOLDER | --download] [--subword spm|bpe] [--from STAGE | --only STAGE]
#        [--rows a,b] [--results DIR] [--dry-run] [--list]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec python "$here/multi30k.py" "$@"
