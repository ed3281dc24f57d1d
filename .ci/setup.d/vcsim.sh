#!/usr/bin/env bash
# Build the vcsim wrapper (tests/vcsim/main.go, govmomi from Debian) into .cache/vcsim.
# Idempotent: skipped when the binary is newer than its source.
set -euo pipefail
cd "$(dirname "$0")/../.."
src=tests/vcsim/main.go
out=.cache/vcsim
if [ -x "$out" ] && [ "$out" -nt "$src" ]; then
  echo "vcsim: $out is up to date"
  exit 0
fi
mkdir -p .cache
export GOPATH=/usr/share/gocode GO111MODULE=off
export GOCACHE="${GOCACHE:-$PWD/.cache/go-build}"
tmp="$out.tmp.$$"
trap 'rm -f "$tmp"' EXIT
go build -o "$tmp" "$src"
mv -f "$tmp" "$out"
echo "vcsim: built $out"
