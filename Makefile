# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_LOGGING_LEVEL ?= WARNING

.PHONY: demo demo-multilabel test test-slow install data bench clean repro-full
FULL_ATTACKS := [badnets,blend,trojan,sig]
FULL_METHODS := [recommended,ft,ft-sam,sft,fsft,ngf,fst,ft-init,fp,nad,anp,ibau,awm,mcr,clp]

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# constraints.txt pins torch==2.13.0: the local CPU wheel, never the CUDA build.
	$(BIN)/pip install --quiet -c constraints.txt -e ".[pipeline,vision,fallback-data,multilabel,video,translation,dev]"
	touch $(STAMP)

install: $(STAMP)

data: $(STAMP)
	$(BIN)/smoothpurify fetch-data

# The demo is the default DVC matrix (params.yaml): `dvc commit` records its outputs in dvc.lock,
# so a `dvc repro` afterwards has nothing to redo.
demo: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/python -m flows.image --profile smoke
	$(BIN)/dvc commit --force --quiet --with-deps image-report || echo "note: dvc commit skipped (dvc.lock not updated)"

# The multi-label modality's smoke run (its DVC stages: multilabel-*).
demo-multilabel: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m flows.multilabel --profile smoke
	$(BIN)/dvc commit --force --quiet --with-deps multilabel-report || echo "note: dvc commit skipped (dvc.lock not updated)"

# The full matrix (hours on a CPU) as a DVC experiment: params.yaml itself stays at the default.
repro-full: $(STAMP)
	$(BIN)/dvc exp run -S 'image.attacks=$(FULL_ATTACKS)' -S 'purify.methods=$(FULL_METHODS)'

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python benchmarks/purification_cost.py

clean:
	rm -rf runs .prefect
