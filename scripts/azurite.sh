#!/usr/bin/env bash
# Install Azurite (npm, pinned) into a folder: scripts/azurite.sh VERSION [FOLDER, default .azurite]
#
# `npm install` takes 15-20 s here even with npm's cache warm (374 packages, 186 MB written), so the
# installed tree is kept in ~/.cache/clusterlens/azurite/VERSION (or $CLUSTERLENS_AZURITE_CACHE/VERSION)
# and later installs of the same version copy it (about 2 s). Remove that folder to install afresh.
set -euo pipefail
version=$1
dest=${2:-.azurite}
root=${CLUSTERLENS_AZURITE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/clusterlens/azurite}
cache=$root/$version

if [ -x "$cache/node_modules/.bin/azurite" ]; then
  rm -rf "$dest.tmp"
  cp -a "$cache" "$dest.tmp"
  rm -rf "$dest"
  mv "$dest.tmp" "$dest"
  echo "azurite $version: copied from $cache"
  exit 0
fi

mkdir -p "$dest"
npm install --prefix "$dest" --no-audit --no-fund --loglevel=error --prefer-offline "azurite@$version"
# Keep a copy for the next clean clone: written aside, then renamed (a concurrent install keeps its own).
if mkdir -p "$root" 2>/dev/null && tmp=$(mktemp -d "$root/.tmp-XXXXXX" 2>/dev/null); then
  cp -a "$dest/." "$tmp/" && mv -T "$tmp" "$cache" 2>/dev/null || rm -rf "$tmp"
fi
