# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_LOGGING_LEVEL ?= WARNING

.PHONY: demo test test-slow install data bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# constraints.txt pins torch==2.13.0: the local CPU wheel, never the CUDA build.
	$(BIN)/pip install --quiet -c constraints.txt -e ".[pipeline,vision,fallback-data,multilabel,dev]"
	touch $(STAMP)

install: $(STAMP)

data: $(STAMP)
	$(BIN)/smoothpurify fetch-data

demo: $(STAMP)
	$(BIN)/python -m flows.image --profile smoke --attacks badnets --methods recommended,ft,ft-sam,sft,fsft,ngf

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python benchmarks/purification_cost.py

clean:
	rm -rf runs .prefect
