#!/usr/bin/env bash
# The servers of the deployment test that do not come from PyPI: PostgreSQL and Redis, from Debian's
# packages, installed only when missing (needs root, or sudo). Services are never started by the install:
# the test starts its own throw-away servers on free loopback ports.
set -euo pipefail

missing=()
if ! command -v initdb >/dev/null && ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
    missing+=(postgresql)
fi
if ! command -v redis-server >/dev/null; then
    missing+=(redis-server)
fi
if [[ ${#missing[@]} -eq 0 ]]; then
    exit 0
fi

echo "Installing ${missing[*]} (Debian packages) for the deployment test"
sudo=()
if [[ $(id -u) -ne 0 ]]; then
    sudo=(sudo)
fi
# Keep apt from starting the packages' own services (the test starts its own on free ports).
policy=/usr/sbin/policy-rc.d
if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null
    "${sudo[@]}" chmod +x "$policy"
    trap '"${sudo[@]}" rm -f "$policy"' EXIT
fi
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
