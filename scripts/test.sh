#!/usr/bin/env bash
# Sets up the environment and runs the test suite (the README's second command).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Two pytest workers, each test file on one (its module fixtures built once): XLA
# compiles on one thread, so a second worker keeps the other core busy meanwhile.
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile tests "$@"
