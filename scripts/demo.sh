#!/usr/bin/env bash
# Sets everything up (system packages, pip install) and runs the demo training job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python3 examples/train_demo.py "$@"
