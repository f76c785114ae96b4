#!/usr/bin/env bash
# WMT'14 en-de: the Kim & Rush distillation table on a GPU machine with internet access.
# Usage: bash examples/wmt14_en_de/run.sh [--dry-run] [--data FOLDER] [--subword spm|bpe]
#        [--from STAGE | --only STAGE] [--rows a,b] [--results DIR] [--list]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec python "$here/wmt14_en_de.py" "$@"
