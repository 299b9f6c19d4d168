# CNCL low-dose CT denoising. `make test` and `make demo` are the two set-up commands.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CT_SAMPLE_DATA ?= $(abspath ../shared/data)
export CT_SAMPLE_DATA
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: venv test test-fast lint demo train-mayo eval-mayo curve-mayo ablate-mayo bench clean

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
DEMO_EPOCHS ?= 5
DEMO_STEPS ?= 120

# Demo: procedural data (no download), a few minutes of CPU training, denoise the demo test
# patient, evaluate. Mytrain.py creates data/demo when it is absent.
demo: $(STAMP)
	rm -rf $(DEMO_RUN)
	$(BIN)/python Mytrain.py --out $(DEMO_RUN) --preset small --epochs $(DEMO_EPOCHS) \
		--steps-per-epoch $(DEMO_STEPS) --verbose 2
	$(BIN)/python Mytest.py --run $(DEMO_RUN) --out $(DEMO_RUN)/test
	$(BIN)/python Myevaluation.py --pred $(DEMO_RUN)/test
	@echo "figures:"; ls -1 $(DEMO_RUN)/test/figures/*.png

# Throughput, MFU, loader ratio and memory (see README "Benchmark"); figures, not assertions.
bench: $(STAMP)
	mkdir -p runs
	$(BIN)/python Mybenchmark.py --preset paper --json runs/bench.json

clean:
	rm -rf runs data/demo .pytest_cache

# Real Mayo data recipe (README "Results on real Mayo data"; choices from `make ablate-mayo`).
# Train: the real L506 pairs 0, 40, 80, 120 (the simulated L067 pairs measured worse, so the
# recipe leaves them out); validate: the real L067 pair; held-out test: real L506 slices 160 and
# 200 (never seen). lr 1e-3 with cosine decay over 70 x 100 steps, about 26 minutes on 2 cores.
MAYO_RUN ?= runs/mayo
# TF's oneDNN CPU kernels for the small preset's 64^2-patch training: 1.8x faster steps than TF's
# default (Eigen) on the 2-core AMD EPYC used here. Not a global default: in TF 2.21 the paper
# preset's whole 512^2 slices ran >25x slower under oneDNN (README "CPU speed").
SMALL_CPU_ENV = TF_ENABLE_ONEDNN_OPTS=$${TF_ENABLE_ONEDNN_OPTS:-1}
MAYO_SIM := runs/mayo_sim/L067_sim
MAYO_MINUTES ?= 26
MAYO_DATA_CHECK = test -d $(CT_SAMPLE_DATA)/mayo_pairs || { echo "error: no Mayo sample data in $(CT_SAMPLE_DATA) (set CT_SAMPLE_DATA)" >&2; exit 2; }
# e.g. MAYO_EXTRA="--adv-weight 0" MAYO_RUN=runs/mayo-noadv: the same recipe without the GAN term
MAYO_EXTRA ?=
MAYO_FLAGS ?= --preset small --epochs 70 --steps-per-epoch 100 --lr 1e-3 --lr-decay cosine

$(MAYO_SIM)/.done: | $(STAMP)
	@$(MAYO_DATA_CHECK)
	$(BIN)/python Mysimulate.py --input $(CT_SAMPLE_DATA)/L067_full_1mm --dose 0.25 \
		--out $(MAYO_SIM) --seed 0 --overwrite
	touch $@

MAYO_REAL = $(CT_SAMPLE_DATA)/mayo_pairs/npy_redcnn $(CT_SAMPLE_DATA)/mayo_pairs/tif_cncl
MAYO_TEST = L506:160 L506:200
MAYO_SPLIT = --exclude $(MAYO_TEST) --val-patients L067
EVAL_OUT ?= $(MAYO_RUN)/test

train-mayo: $(STAMP)
	@$(MAYO_DATA_CHECK)
	rm -rf $(MAYO_RUN)
	$(SMALL_CPU_ENV) $(BIN)/python Mytrain.py --data $(MAYO_REAL) $(MAYO_SPLIT) --out $(MAYO_RUN) \
		$(MAYO_FLAGS) --time-limit $(MAYO_MINUTES) --snapshot-every 5 $(MAYO_EXTRA) --verbose 2
	$(MAKE) eval-mayo MAYO_RUN=$(MAYO_RUN)

# Held-out test of a run: denoise the L506 slices $(MAYO_TEST) (never trained on), score them.
eval-mayo: $(STAMP)
	$(BIN)/python Mytest.py --data $(CT_SAMPLE_DATA)/mayo_pairs/npy_redcnn --slices $(MAYO_TEST) \
		--run $(MAYO_RUN) --out $(EVAL_OUT) --overwrite $(EVAL_FLAGS)
	$(BIN)/python Myevaluation.py --pred $(EVAL_OUT)

# Held-out PSNR against training minutes: every snapshot of train-mayo, one table row each.
curve-mayo: $(STAMP)
	@test -d $(MAYO_RUN)/snapshots || { echo "error: no $(MAYO_RUN)/snapshots (run make train-mayo)" >&2; exit 2; }
	for w in $(MAYO_RUN)/snapshots/generator_epoch*.weights.h5; do \
		$(MAKE) -s eval-mayo EVAL_OUT=$(MAYO_RUN)/curve/$$(basename $$w .weights.h5) \
			EVAL_FLAGS="--weights $$w --no-figures" > /dev/null || exit 1; \
	done
	$(BIN)/python Myevaluation.py --compare $(MAYO_RUN)/curve/generator_epoch*

# Ablation: each variant changes one choice of the recipe and trains a fixed number of steps (the
# same for all, so the table does not depend on machine load; `make -j2 ablate-mayo` runs two at
# a time), then the held-out test. Results: one row per variant (Myevaluation.py --compare).
ABL_DIR ?= runs/ablate
ABL_EPOCHS ?= 6
ABL_STEPS ?= 100
ABL_VARIANTS ?= recipe adv0 lr1e-3 lambda10 patch128 keep-air no-sim no-sim-lr1e-3 \
	no-sim-lr1e-3-seed1
ABL_recipe :=
ABL_adv0 := --adv-weight 0
ABL_lr1e-3 := --lr 1e-3
ABL_lambda10 := --lambda-l1 10
ABL_patch128 := --patch 128 --batch 4
ABL_keep-air := --keep-air
ABL_no-sim :=
ABL_no-sim-lr1e-3 := --lr 1e-3
ABL_no-sim-lr1e-3-seed1 := --lr 1e-3 --seed 1

ablate-mayo: $(foreach v,$(ABL_VARIANTS),$(ABL_DIR)/$(v)/test/metrics.json)
	$(BIN)/python Myevaluation.py --compare $(patsubst %/metrics.json,%,$^)

$(ABL_DIR)/%/test/metrics.json: | $(STAMP) $(MAYO_SIM)/.done
	rm -rf $(ABL_DIR)/$*
	$(SMALL_CPU_ENV) $(BIN)/python Mytrain.py --data $(MAYO_REAL) $(if $(filter no-sim%,$*),,$(MAYO_SIM)) \
		$(MAYO_SPLIT) --out $(ABL_DIR)/$* --preset small --epochs $(ABL_EPOCHS) \
		--steps-per-epoch $(ABL_STEPS) --lr-decay cosine $(ABL_$*) --verbose 2
	$(MAKE) eval-mayo MAYO_RUN=$(ABL_DIR)/$* EVAL_FLAGS=--no-figures
