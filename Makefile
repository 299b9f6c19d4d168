# CNCL low-dose CT denoising. `make test` and `make demo` are the two set-up commands.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CT_SAMPLE_DATA ?= $(abspath ../shared/data)
export CT_SAMPLE_DATA
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: venv test test-fast lint demo train-mayo bench clean

venv: $(STAMP)
$(STAMP): requirements.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -ra -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .

DEMO_RUN ?= runs/demo
DEMO_EPOCHS ?= 6
DEMO_STEPS ?= 150

# Demo: procedural data (no download), a few minutes of CPU training, denoise the demo test
# patient, evaluate. Mytrain.py creates data/demo when it is absent.
demo: $(STAMP)
	rm -rf $(DEMO_RUN)
	$(BIN)/python Mytrain.py --out $(DEMO_RUN) --preset small --epochs $(DEMO_EPOCHS) \
		--steps-per-epoch $(DEMO_STEPS) --verbose 2
	$(BIN)/python Mytest.py --run $(DEMO_RUN) --out $(DEMO_RUN)/test
	$(BIN)/python Myevaluation.py --pred $(DEMO_RUN)/test
	@echo "figures:"; ls -1 $(DEMO_RUN)/test/figures/*.png

clean:
	rm -rf runs data/demo .pytest_cache
