#!/usr/bin/env bash
# Regenerate requirements/constraints.txt (`make constraints`).
#
# Airflow's own constraints file (constraints-<version>/constraints-<python>.txt on GitHub) cannot be
# fetched where only package registries are reachable, so this makes pins as Airflow makes its own: it
# resolves, in a clean throw-away venv under /tmp, Airflow $AIRFLOW_VERSION together with the providers a
# deployment uses (Amazon with the s3fs extra, Google, Celery, Postgres, Redis), the object-storage
# filesystems (s3fs, gcsfs: recent releases, pip picks a 2020 s3fs otherwise), the drivers of the
# deployment test (psycopg2-binary, asyncpg, moto[server]) and this package with its test extra; then it
# pins everything installed (`pip freeze`, minus this package).
#
# Airflow stays at $AIRFLOW_VERSION; our direct dependencies and test tools (KEEP below) stay at their
# pins in the current constraints file, unless UPGRADE=1 lets them move too. Caps found necessary by the
# deployment test (make deploy-test) are listed, with the reason, in REQUIREMENTS.
#
# Usage: requirements/make-constraints.sh            (PYTHON=python3.11, AIRFLOW_VERSION=3.3.2 by default)
#        UPGRADE=1 requirements/make-constraints.sh  (let the kept packages move as well)
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
AIRFLOW_VERSION=${AIRFLOW_VERSION:-3.3.2}
OUT=requirements/constraints.txt
# Our direct dependencies (setup.cfg install_requires) and the test extra: kept at their current pins.
KEEP="looker_sdk requests urllib3 ijson orjson pytest pytest-timeout hypothesis ruff"
REQUIREMENTS=(
    "apache-airflow==${AIRFLOW_VERSION}"
    "apache-airflow-providers-amazon[s3fs]"
    "apache-airflow-providers-google"
    "apache-airflow-providers-celery"
    "apache-airflow-providers-postgres"
    "apache-airflow-providers-redis"
    "s3fs>=2025.1"
    "gcsfs>=2025.1"
    "psycopg2-binary"
    "asyncpg"
    "moto[server]"
    # apache-airflow-providers-celery 3.26.0 imports celery.backends.database.retry, gone in celery 5.7.0.
    "celery<5.7"
    ".[test]"
)

work=$(mktemp -d /tmp/lsg-constraints.XXXXXX)
trap 'rm -rf "$work"' EXIT

# The current pins of the kept packages, as a preference for the resolver.
: >"$work/keep.txt"
if [[ "${UPGRADE:-0}" != 1 && -f "$OUT" ]]; then
    for name in $KEEP; do
        pattern=$(echo "$name" | sed 's/[-_.]/[-_.]/g')
        grep -iE "^${pattern}==" "$OUT" >>"$work/keep.txt" || true
    done
fi
echo "Keeping: $(tr '\n' ' ' <"$work/keep.txt")"

"$PYTHON" -m venv "$work/venv"
pip=("$work/venv/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade pip
"${pip[@]}" install -q -c "$work/keep.txt" "${REQUIREMENTS[@]}"
"${pip[@]}" check

python_version=$("$work/venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
{
    echo "# Pins for Apache Airflow ${AIRFLOW_VERSION} on Python ${python_version}: regenerate with 'make constraints'"
    echo "# (requirements/make-constraints.sh), which wrote this file on $(date -u +%Y-%m-%d). It is what a clean venv"
    echo "# holds (pip freeze, minus this package) after installing, with the previous pins of"
    echo "#   ${KEEP}"
    echo "# kept as constraints:"
    printf "#   %s\n" "${REQUIREMENTS[@]}"
    echo "# Used by 'make install' (pip install -c requirements/constraints.txt -e '.[test]') and 'make deploy-test'"
    echo "# (pip install -c requirements/constraints.txt . 'apache-airflow-providers-amazon[s3fs]' ...)."
    "${pip[@]}" freeze --exclude airflow-provider-looker-segment
} >"$work/constraints.txt"
mv "$work/constraints.txt" "$OUT"
echo "Wrote $OUT ($(grep -vc '^#' "$OUT") pins)"
