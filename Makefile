# The two commands a new user runs: `make demo` and `make test`. Both create .venv on first use and reuse it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONSTRAINTS := requirements/constraints.txt

.PHONY: install demo test lint format bench bench-venv bench-smoke clean

$(STAMP): setup.cfg pyproject.toml $(CONSTRAINTS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade "pip>=23" "setuptools>=68" wheel
	$(BIN)/python -m pip install -q --disable-pip-version-check -c $(CONSTRAINTS) -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

demo: install
	PYTHONPATH=tests $(BIN)/python -m standins.demo $(DEMO_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(BIN)/python -m pytest -q -p no:cacheprovider

# The benchmark's own venv, with the baseline (segment-analytics-python) and looker-sdk only: see bench/requirements.txt.
BENCH_VENV := bench/.venv
BENCH_STAMP := $(BENCH_VENV)/.installed

$(BENCH_STAMP): bench/requirements.txt
	@test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q --disable-pip-version-check -r bench/requirements.txt
	@touch $(BENCH_STAMP)

bench-venv: $(BENCH_STAMP)

# Ours vs segment-analytics-python at 10 k, 100 k and 1 M rows (about 10 minutes); writes bench/RESULTS.md and
# bench/out/results.json. Options through BENCH_ARGS, e.g. make bench BENCH_ARGS="--sizes 10000,100000 --repeat 1".
bench: install $(BENCH_STAMP)
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# About 15 s: ours and the floor at 10 k rows, one run, nothing written (tests/test_bench_smoke.py does the same).
bench-smoke: install
	$(BIN)/python bench/run.py --sizes 10000 --repeat 1 --cases ours,floor --no-profile --results - --json -

clean:
	rm -rf $(VENV) $(DEPLOY_VENV) build dist *.egg-info .pytest_cache .ruff_cache

# Regenerate requirements/constraints.txt: Airflow 3.3.2 resolved with the Amazon (s3fs), Google, Celery,
# Postgres and Redis providers, s3fs, gcsfs and this package's dependencies and test extra, in a throw-away
# venv under /tmp (about 5 minutes); see the script's header.
.PHONY: constraints deploy-venv deploy-test
CONSTRAINTS_PYTHON ?= python3.11

constraints:
	PYTHON=$(CONSTRAINTS_PYTHON) bash requirements/make-constraints.sh

# The deployment test (tests/deploy, about 4 minutes; 5 with a new .venv-deploy): a real Airflow on
# 127.0.0.1 with PostgreSQL, Redis, the CeleryExecutor and two workers, moto's S3 for the sync state and the
# stand-ins, used through the REST API. Its own venv, .venv-deploy, pinned by the constraints; PostgreSQL
# and Redis come from Debian's packages (installed by tests/deploy/system-packages.sh when missing).
DEPLOY_VENV := .venv-deploy
DEPLOY_BIN := $(DEPLOY_VENV)/bin
DEPLOY_STAMP := $(DEPLOY_VENV)/.installed
DEPLOY_PACKAGES := "apache-airflow-providers-amazon[s3fs]" apache-airflow-providers-celery \
	apache-airflow-providers-postgres apache-airflow-providers-redis psycopg2-binary asyncpg "moto[server]" \
	pytest pytest-timeout

$(DEPLOY_STAMP): setup.cfg pyproject.toml $(CONSTRAINTS)
	@test -x $(DEPLOY_BIN)/python || $(PYTHON) -m venv $(DEPLOY_VENV)
	$(DEPLOY_BIN)/python -m pip install -q --disable-pip-version-check --upgrade "pip>=23" "setuptools>=68" wheel
	$(DEPLOY_BIN)/python -m pip install -q --disable-pip-version-check -c $(CONSTRAINTS) . $(DEPLOY_PACKAGES)
	@touch $(DEPLOY_STAMP)

deploy-venv: $(DEPLOY_STAMP)

deploy-test: $(DEPLOY_STAMP)
	bash tests/deploy/system-packages.sh
	$(DEPLOY_BIN)/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation \
		--force-reinstall .
	LSG_DEPLOY_TEST=1 $(DEPLOY_BIN)/python -m pytest -q -p no:cacheprovider -rA tests/deploy
