#!/usr/bin/env bash
# IWSLT'14 de-en: the Kim & Rush distillation table on a GPU machine with internet access.
# Usage: bash examples/iwslt14/run.sh [--dry-run] [--data FOLDER] [--subword spm|bpe]
#        [--from STAGE | --only STAGE] [--rows a,b] [--results DIR] [--list]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec python "$here/iwslt14.py" "$@"
