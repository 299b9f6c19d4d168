# CNCL low-dose CT denoising. `make test` and `make demo` are the two set-up commands.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CT_SAMPLE_DATA ?= $(abspath ../shared/data)
export CT_SAMPLE_DATA
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: venv test test-fast lint demo qa train-mayo train-mayo-psnr train-mayo-all \
	train-mayo-all-psnr eval-mayo curve-mayo ablate-mayo bench gpu-check clean

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
# The demo phantom's full dose is noiseless: there is no full-dose texture for the adversarial
# term to keep, and in 600 steps it only costs PSNR (README "What does the adversarial term do?":
# DEMO04 34.45 dB L1 only vs 29.47 dB at the official balance). So the demo trains the PSNR end.
DEMO_FLAGS ?= --adv-weight 0

# Demo: procedural data (no download), a few minutes of CPU training, denoise the demo test
# patient, evaluate. Mytrain.py creates data/demo when it is absent.
demo: $(STAMP)
	rm -rf $(DEMO_RUN)
	$(BIN)/python Mytrain.py --out $(DEMO_RUN) --preset small --epochs $(DEMO_EPOCHS) \
		--steps-per-epoch $(DEMO_STEPS) $(DEMO_FLAGS) --verbose 2
	$(BIN)/python Mytest.py --run $(DEMO_RUN) --out $(DEMO_RUN)/test
	$(BIN)/python Myevaluation.py --pred $(DEMO_RUN)/test
	@echo "figures:"; ls -1 $(DEMO_RUN)/test/figures/*.png

# Image-quality phantom (README "Image quality beyond PSNR"): TTF / MTF50, CNR, NPW d' / AUC and
# the dose ladder of a run (default the demo run) on the digital QA phantom (built once).
# The 300 mm adult-abdomen phantom, 4 doses x 32 realisations (QA_SIM_FLAGS="--qa-diameter 200 300"
# for two sizes); Myevaluation.py ends with the quotable summary line per size.
QA_DIR ?= data/qa-v2
QA_RUN ?= $(DEMO_RUN)
QA_SIM_FLAGS ?=
qa: $(STAMP)
	test -f $(QA_DIR)/SIMULATION.json || $(BIN)/python Mysimulate.py --qa $(QA_DIR) $(QA_SIM_FLAGS)
	$(BIN)/python Myevaluation.py --qa $(QA_DIR) --run $(QA_RUN)

# Throughput, MFU, loader ratio and memory (see README "Benchmark"); figures, not assertions.
# BENCH_FLAGS=$(BENCH_RATIOS): only the ratios (matmul, training, inference, loader; ~15 min).
BENCH_FLAGS ?=
BENCH_JSON ?= runs/bench.json
BENCH_RATIOS := --sections matmul,train,infer,data --train-batches 16 --slice-batches none \
	--infer-batches 4
bench: $(STAMP)
	mkdir -p $(dir $(BENCH_JSON))
	$(BIN)/python Mybenchmark.py --preset paper --json $(BENCH_JSON) $(BENCH_FLAGS)

# The GPU path (README "GPU check"): build info, paper-preset training in float32 / float16 /
# bfloat16 with and without XLA, Mytrain -> Mytest -> Myevaluation on 20 slices; ~5 min on one
# GPU; prints "no GPU" and exits 0 on a machine without one.
gpu-check: $(STAMP)
	mkdir -p runs
	$(BIN)/python gpu_check.py --json runs/gpu_check.json

clean:
	rm -rf runs data/demo .pytest_cache

# Real Mayo data recipe (README "Results on real Mayo data" and "What does the adversarial term
# do?"). Train: the real L506 pairs 0, 40, 80, 120 (the simulated L067 pairs measured worse, so
# the recipe leaves them out); validate: the real L067 pair; held-out test: real L506 slices 160
# and 200 (never seen). The cpu recipe (128^2 patches, batch 4, the chosen loss balance) with lr
# 1e-3 and cosine decay over 10 x 100 steps; the held-out test scores the last epoch's generator
# (a validation-PSNR pick would favour the smoothest epoch, against the texture the GAN is for).
# Mytrain.py chooses the CPU kernels itself (README "CPU speed").
MAYO_RUN ?= runs/mayo
MAYO_SIM := runs/mayo_sim/L067_sim
MAYO_MINUTES ?= 26
MAYO_DATA_CHECK = test -d $(CT_SAMPLE_DATA)/mayo_pairs || { echo "error: no Mayo sample data in $(CT_SAMPLE_DATA) (set CT_SAMPLE_DATA)" >&2; exit 2; }
# e.g. MAYO_EXTRA="--lambda-l1 5" MAYO_RUN=runs/mayo-l5: the same recipe at another loss balance
MAYO_EXTRA ?=
MAYO_FLAGS ?= --recipe cpu --epochs 10 --steps-per-epoch 100 --lr 1e-3 --lr-decay cosine
MAYO_WEIGHTS ?= latest

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
	$(BIN)/python Mytrain.py --data $(MAYO_REAL) $(MAYO_SPLIT) --out $(MAYO_RUN) \
		$(MAYO_FLAGS) --time-limit $(MAYO_MINUTES) --snapshot-every 5 $(MAYO_EXTRA) --verbose 2
	$(MAKE) eval-mayo MAYO_RUN=$(MAYO_RUN) MAYO_WEIGHTS=$(MAYO_WEIGHTS)

# The PSNR end of the trade-off: the same recipe with L1 only (no adversarial term), twice the
# steps (20 x 100): +0.20 dB (+0.10 to +0.27) over 10 x 100 in each of the 7 cross-validation folds,
# and without the block-mean term (the L1 end keeps its input's mean CT number without it; the
# folds measured it without; README "Cross-validation").
PSNR_EXTRA := --adv-weight 0 --epochs 20 --block-mean-weight 0
train-mayo-psnr:
	$(MAKE) train-mayo MAYO_RUN=runs/mayo-psnr MAYO_EXTRA="$(PSNR_EXTRA)"

# The shipped models: the recipe the cross-validation chose, trained on all 7 real pairs with
# nothing held out (so nothing to score here: their expected quality is make cv-mayo's, README
# "Cross-validation"). Use them on new data: python Mytest.py --run runs/mayo-all --data ...
MAYO_ALL_RUN ?= runs/mayo-all
train-mayo-all: $(STAMP)
	@$(MAYO_DATA_CHECK)
	rm -rf $(MAYO_ALL_RUN)
	$(BIN)/python Mytrain.py --data $(MAYO_REAL) --val-patients none --out $(MAYO_ALL_RUN) \
		$(MAYO_FLAGS) --time-limit $(MAYO_MINUTES) $(MAYO_EXTRA) --verbose 2
	@echo "$(MAYO_ALL_RUN): trained on all 7 real pairs, nothing held out; its expected quality is the cross-validation's (make cv-mayo)"

train-mayo-all-psnr:
	$(MAKE) train-mayo-all MAYO_ALL_RUN=runs/mayo-all-psnr MAYO_EXTRA="$(PSNR_EXTRA)"

# Held-out test of a run: denoise the L506 slices $(MAYO_TEST) (never trained on), score them.
eval-mayo: $(STAMP)
	$(BIN)/python Mytest.py --data $(CT_SAMPLE_DATA)/mayo_pairs/npy_redcnn --slices $(MAYO_TEST) \
		--run $(MAYO_RUN) --weights $(MAYO_RUN)/generator_$(MAYO_WEIGHTS).weights.h5 \
		--out $(EVAL_OUT) --overwrite $(EVAL_FLAGS)
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
ABL_VARIANTS ?= recipe adv0 lr1e-3 lambda20 patch64 keep-air no-sim no-sim-lr1e-3 \
	no-sim-lr1e-3-seed1
ABL_recipe :=
ABL_adv0 := --adv-weight 0
ABL_lr1e-3 := --lr 1e-3
ABL_lambda20 := --lambda-l1 20
ABL_patch64 := --patch 64 --batch 16
ABL_keep-air := --keep-air
ABL_no-sim :=
ABL_no-sim-lr1e-3 := --lr 1e-3
ABL_no-sim-lr1e-3-seed1 := --lr 1e-3 --seed 1

ablate-mayo: $(foreach v,$(ABL_VARIANTS),$(ABL_DIR)/$(v)/test/metrics.json)
	$(BIN)/python Myevaluation.py --compare $(patsubst %/metrics.json,%,$^)

$(ABL_DIR)/%/test/metrics.json: | $(STAMP) $(MAYO_SIM)/.done
	rm -rf $(ABL_DIR)/$*
	$(BIN)/python Mytrain.py --data $(MAYO_REAL) $(if $(filter no-sim%,$*),,$(MAYO_SIM)) \
		$(MAYO_SPLIT) --out $(ABL_DIR)/$* --recipe cpu --epochs $(ABL_EPOCHS) \
		--steps-per-epoch $(ABL_STEPS) --lr-decay cosine $(ABL_$*) --verbose 2
	$(MAKE) eval-mayo MAYO_RUN=$(ABL_DIR)/$* EVAL_FLAGS=--no-figures

# Cross-validation (issue 25): the recipe $(MAYO_FLAGS) trained K = 7 times, each fold testing
# one of the 7 real pairs (never trained on) and validating on L067 (fold 1 tests L067 and
# validates on nothing); per-fold table and mean +- sd over folds. Resumable: run it again to
# finish the folds that are missing. Fixed step count, so the table does not depend on load.
# CV_EXTRA="--adv-weight 0" CV_OUT=...: another recipe (make cv-mayo-psnr: the PSNR end).
# CV_DATA='$(MAYO_REAL) $(MAYO_FD_1MM)' CV_EXTRA="--folds 2 3 4 5 6 7 --simulate-dose 0.25
# --simulated-share 0.25": every fold also trains on the 56 L067 full-dose slices with simulated
# quarter dose (fold 1 left out: it tests L067, the same patient).
.PHONY: cv-mayo cv-mayo-psnr
CV_OUT ?= runs/cv-mayo
CV_EXTRA ?=
MAYO_FD_1MM = $(CT_SAMPLE_DATA)/L067_full_1mm
CV_DATA ?= $(MAYO_REAL)
cv-mayo: $(STAMP)
	@$(MAYO_DATA_CHECK)
	nice $(BIN)/python Mycrossval.py --data $(CV_DATA) --out $(CV_OUT) $(MAYO_FLAGS) \
		--verbose 2 $(CV_EXTRA)

cv-mayo-psnr:
	$(MAKE) cv-mayo CV_OUT=runs/cv-mayo-psnr CV_EXTRA="$(PSNR_EXTRA)"
