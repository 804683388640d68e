#!/usr/bin/env bash
# The project's one test command (README "Run the tests", and .ci/run): creates or reuses .venv, installs the
# test extras, installs Debian's Chromium for the browser test when it is missing, then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${MVPSEG_VENV:-.venv}"
# Disk: a new .venv takes ~6.5 GB where pip picks torch's CUDA build (torchvision needs it on x86_64); the run
# itself peaks at ~0.4 GB in the temp folder and leaves nothing there (tests/conftest.py). A full disk shows up as
# dozens of unrelated errors ("No space left on device"), so say it first.
free_mb() { df -Pm "$1" 2>/dev/null | awk 'NR==2 {print $4}'; }
need_mb=1024; [ -x "$VENV/bin/python" ] || need_mb=8192
for where in . "${TMPDIR:-/tmp}"; do
  have_mb="$(free_mb "$where")"
  if [ -n "$have_mb" ] && [ "$have_mb" -lt "$need_mb" ]; then
    echo "[test.sh] warning: only ${have_mb} MB free on the disk of $where (about ${need_mb} MB needed)" >&2
  fi
done
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
