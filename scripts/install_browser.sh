#!/usr/bin/env bash
# `make test` runs this first (best effort): Debian's chromium for tests/test_ui_browser.py, which drives it through
# Playwright's Python API. Never `playwright install`: that downloads browsers from Playwright's CDN.
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
    echo "install_browser: /usr/bin/chromium is already installed"
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"  # CI runners that are not root have passwordless sudo
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq chromium
test -x /usr/bin/chromium
echo "install_browser: installed /usr/bin/chromium"
