#!/usr/bin/env bash
# Creates .venv with the pinned dependencies and the test extras, and (as root, on Debian) the headless
# Chromium that the attention-page browser test drives.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -r requirements.txt
# The package itself plus the test extras (pytest, selenium, libtpu for the TPU
# dry-run tests); its runtime dependencies are the pins above.
.venv/bin/pip install -q -e '.[test]'

# Headless Chromium for tests/test_attention_page.py (skipped there when absent).
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "setup.sh: chromium not installed (needs root and apt-get); the browser test will skip"
  fi
fi
