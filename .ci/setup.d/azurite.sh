#!/usr/bin/env bash
# Install Azurite (Azure Storage emulator) with npm into .cache/node (project-local prefix).
# Idempotent and quiet: skipped when .cache/node/bin/azurite-blob already exists.
set -euo pipefail
cd "$(dirname "$0")/../.."
prefix=.cache/node
if [ -x "$prefix/bin/azurite-blob" ]; then
  echo "azurite: $prefix/bin/azurite-blob is installed"
  exit 0
fi
command -v npm >/dev/null || { echo "azurite: npm is not installed (apt-get install npm)" >&2; exit 1; }
mkdir -p "$prefix"
npm install --global --prefix "$prefix" --no-audit --no-fund --loglevel=error azurite@3 >/dev/null
"$prefix/bin/azurite-blob" --version >/dev/null
echo "azurite: installed $prefix/bin/azurite-blob"
