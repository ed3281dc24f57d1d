#!/usr/bin/env bash
# PostgreSQL 15 binaries for the fleet tests (tests/fixtures/postgres.py makes a private cluster
# on a free port in a temp dir). Only the Debian packages: no system-wide server is started.
set -euo pipefail
if [ -x /usr/lib/postgresql/15/bin/initdb ] && [ -x /usr/lib/postgresql/15/bin/postgres ]; then
  echo "postgres: /usr/lib/postgresql/15/bin is there"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# policy-rc.d 101: the package's postinst must not start the system cluster
policy=/usr/sbin/policy-rc.d
had_policy=0
[ -e "$policy" ] && had_policy=1
if [ "$had_policy" = 0 ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy"
  chmod +x "$policy"
  trap 'rm -f "$policy"' EXIT
fi
apt-get install -y -qq --no-install-recommends postgresql
echo "postgres: installed $(/usr/lib/postgresql/15/bin/postgres --version)"
