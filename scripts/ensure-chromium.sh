#!/usr/bin/env bash
# Make sure Debian's chromium is installed: the browser tests drive it with Playwright
# (`playwright install` downloads browsers and cannot here).
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
echo "chromium is not installed: installing Debian's chromium package for the browser tests..."
if command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else SUDO="none"; fi
  if [ "$SUDO" != none ]; then
    ($SUDO apt-get install -y -qq chromium || ($SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium)) && exit 0
  fi
fi
cat >&2 <<MSG
Could not install chromium automatically (no apt-get, or no root/sudo).
Install it yourself (sudo apt-get install -y chromium), so that /usr/bin/chromium exists, then run make again.
MSG
exit 1
