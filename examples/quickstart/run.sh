#!/usr/bin/env bash
# Quickstart: teacher -> word-level KD student -> BLEU/chrF on Multi30k, on the CPU.
# Usage: bash examples/quickstart/run.sh [--data FOLDER | --download] [--preset small|tiny]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec python "$here/quickstart.py" "$@"
