#!/usr/bin/env bash
# The project's one test command (README "Run the tests", and .ci/run): creates or reuses .venv, installs the
# test extras, installs Debian's Chromium for the browser test when it is missing, then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${MVPSEG_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[test.sh] creating virtualenv $VENV"
  python3 -m venv "$VENV"
fi
echo "[test.sh] installing requirements-dev.txt"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements-dev.txt 2> >(grep -v "is ignored: it is neither" >&2)
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    echo "[test.sh] installing Debian's chromium for the browser test"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "[test.sh] chromium could not be installed; the browser test will be skipped"
  else
    echo "[test.sh] /usr/bin/chromium missing and not root: the browser test will be skipped"
  fi
fi
export HF_HUB_OFFLINE=1 MVPSEG_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False
exec "$VENV/bin/python" -m pytest -q "$@"
