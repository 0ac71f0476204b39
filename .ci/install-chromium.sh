#!/usr/bin/env bash
# Installs a headless Chromium (+ a basic font) for tests/test_report_html.py, which renders report.html
# in a real browser. Idempotent: does nothing when chromium/chromium-browser/google-chrome is already on PATH.
# Debian/Ubuntu only (apt-get); needs root or passwordless sudo.
set -euo pipefail

for b in chromium chromium-browser google-chrome google-chrome-stable; do
  if command -v "$b" >/dev/null 2>&1; then
    echo "install-chromium: $b already installed at $(command -v "$b")"
    exit 0
  fi
done

if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-chromium: no chromium on PATH and no apt-get here; install chromium (or google-chrome) by hand" >&2
  exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    echo "install-chromium: need root (or passwordless sudo) to apt-get install chromium" >&2
    exit 1
  fi
fi

export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get update; then
  echo "install-chromium: apt-get update failed (is the Debian mirror reachable?)" >&2
  exit 1
fi
if ! $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium fonts-dejavu-core; then
  echo "install-chromium: apt-get install chromium fonts-dejavu-core failed" >&2
  exit 1
fi

if ! command -v chromium >/dev/null 2>&1; then
  echo "install-chromium: apt-get succeeded but 'chromium' is still not on PATH" >&2
  exit 1
fi
echo "install-chromium: installed $(chromium --version 2>/dev/null || echo chromium)"
