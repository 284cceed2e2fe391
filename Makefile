# Everything runs from the project venv; the stamp makes reinstalling happen
# only when pyproject.toml changes, not on every make invocation.
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

# Offline copy of the IMDB archive kept beside the repo (shared/data); when it
# exists the download stage reads it instead of fetching from the network.
IMDB_ARCHIVE ?= $(wildcard $(abspath $(CURDIR)/../shared/data/aclImdb_v1_text.tar.gz))
ifneq ($(IMDB_ARCHIVE),)
export IMDB_ARCHIVE
endif

.PHONY: pipeline test bench venv ui screenshots team-services

venv: $(PY)

$(PY):
	python3 -m venv $(VENV)

$(VENV)/install.stamp: pyproject.toml | $(PY)
	$(PIP) install -e .
	touch $@

# A current pip first: the one a new venv brings (23.x) backtracks for minutes between boto3 and
# aiobotocore's pin on botocore (moto and dvc-s3 in the dev extra); pip 26 settles it in about one.
$(VENV)/install-dev.stamp: pyproject.toml | $(PY)
	$(PIP) install --upgrade pip
	$(PIP) install -e '.[dev]'
	touch $@

# dvc's stage commands call plain `python`, so the venv must come first on PATH.
pipeline: $(VENV)/install.stamp
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/dvc repro

test: $(VENV)/install-dev.stamp
	$(PY) -m pytest -n 2 -q

bench: $(VENV)/install.stamp
	$(PY) benchmarks/speed.py

# MLflow's UI on the project's runs; prints the link to the experiment's charts (Ctrl-C stops it).
ui: $(VENV)/install.stamp
	$(VENV)/bin/rnn ui

# Retake the README's MLflow screenshots (docs/) from the current store: needs chromium and node.
screenshots: $(VENV)/install.stamp
	$(PY) docs/screenshots.py

# The services of "Working as a team" (README) on loopback, to try the team flow on one machine:
# PostgreSQL in a temporary folder, moto as the S3 endpoint, an MLflow server using both, with
# logins (docs/team-security.md): an admin and one MLflow account per name in TEAM_USERS, each with
# a generated password in a credentials file. Prints the settings to use; Ctrl-C stops all three
# and throws their data and accounts away.
TEAM_USERS ?= alice bob
team-services: $(VENV)/install-dev.stamp
	$(PY) tests/team_services.py $(addprefix --user ,$(TEAM_USERS))
