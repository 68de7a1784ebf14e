#!/usr/bin/env bash
# Create .venv and install uadkit into it. Usage: scripts/setup.sh [test]
# torch is installed first as the CPU build (UADKIT_TORCH, default torch==2.13.0, a local wheel on the
# project's machines); set UADKIT_TORCH=torch (or a CUDA build) elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
pip install -q --disable-pip-version-check "${UADKIT_TORCH:-torch==2.13.0}" 2>&1 | grep -v "^WARNING: Location" || true
# The plain setup includes the service (`uadkit --serve` in the README); `test` adds the test tools.
extra="[serve]"
[ "${1:-}" = "test" ] && extra="[serve,test]"
pip install -q --disable-pip-version-check -e ".${extra}" 2>&1 | grep -v "^WARNING: Location" || true
if [ "${1:-}" = "test" ] && ! command -v chromium >/dev/null 2>&1; then
  # The web page test drives Debian's Chromium (playwright cannot download a browser here).
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "note: chromium not installed; the web page test will be skipped (CI installs it)"
  fi
fi
if [ "${1:-}" = "test" ] && ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
  # The record store tests start a throwaway PostgreSQL server from Debian's package (as the postgres user).
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  else
    echo "note: postgresql not installed; the PostgreSQL record store tests will be skipped (CI installs it)"
  fi
fi
python -c "import torch, uadkit; print('uadkit', uadkit.__version__, '| torch', torch.__version__)"
