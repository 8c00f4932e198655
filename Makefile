# thinfleet's build, test and demo targets. CI (.ci/run) calls `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LLAMA_VERSION := 0.3.36
LLAMA_CMAKE_ARGS := $(shell scripts/llama-cmake-args.sh)
LLAMA_FLAGS_ID := $(shell echo "$(LLAMA_VERSION) $(LLAMA_CMAKE_ARGS)" | sha256sum | cut -c1-12)
# Built wheels are cached per user, keyed by version and flags: a rebuild takes ~7 min on 2 cores.
WHEEL_DIR := $(HOME)/.cache/thinfleet/wheels/$(LLAMA_FLAGS_ID)
STAMP := $(VENV)/.installed-$(LLAMA_FLAGS_ID)

.PHONY: install install-train demo demo-ecommerce test lint pytest schema train train-robust soup router train-ecommerce injection \
	train-pruned frontier \
	eval eval-ecommerce bench faults clean chart

install: $(STAMP)

$(STAMP): pyproject.toml scripts/bootstrap-debian.sh
	scripts/bootstrap-debian.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel
	@if ! ls $(WHEEL_DIR)/llama_cpp_python-$(LLAMA_VERSION)-*.whl >/dev/null 2>&1; then \
	  echo "building llama-cpp-python $(LLAMA_VERSION) with CMAKE_ARGS=$(LLAMA_CMAKE_ARGS)"; \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	    $(BIN)/pip wheel --no-deps --no-cache-dir --no-binary llama-cpp-python \
	    -w $(WHEEL_DIR) llama-cpp-python==$(LLAMA_VERSION); \
	fi
	$(BIN)/pip install -q --force-reinstall --no-deps $(WHEEL_DIR)/llama_cpp_python-$(LLAMA_VERSION)-*.whl
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/python scripts/install-helm.py $(BIN)
	touch $@

demo: install
	$(BIN)/thinfleet demo

# The reference article's job: 165 held-out e-commerce tickets, label plus product_name and
# brief_description, through the fleet with the shipped ecommerce router.
demo-ecommerce: install
	$(BIN)/thinfleet demo --job ecommerce

BANKING77 ?= ../shared/datasets/banking77/train.csv
STAGE1 := models/trained/banking77-gemma3-270m-lora
ROBUST := models/trained/banking77-gemma3-270m-lora-robust
# the shipped router: the soup of the R-Drop stage 2 with the accounts grammar and the R-Drop
# stage 2's second training order (`make router`), served merged into one Q8_0 file
# (thinfleet.demo.SHIPPED_QUANT)
ROUTER := models/trained/banking77-gemma3-270m-lora-accounts-pair
# the routers shipped before it: models/trained/banking77-gemma3-270m-lora-rdrop-pair, the soup
# of two training orders of the R-Drop stage 2 (the twenty-seventh to twenty-ninth sessions;
# `make var/soup/rdrop-pair/manifest.json` rebuilds the same files), and the soup of two stage-2
# runs from the plain stage 1 (`make soup`)
SOUP_ROUTER := models/trained/banking77-gemma3-270m-lora-soup

install-train: install
	$(BIN)/pip install -q -e '.[dev,train]'

# The shipped router is built in three steps: stage 1, two stage-2 runs from it, their soup.
# Stage 1: the recipe's defaults
# (training.finetune.Recipe: 3 epochs, label smoothing 0.1; about 1 h 45 min on 2 CPU cores;
# uses a CUDA GPU when present).
train: install-train
	$(TRAIN_BANKING77) --out $(STAGE1)

# Stage 2 (issue 12), the soup's first ingredient: continue from stage 1 with adversarial
# augmentation (half the injection corpus's train styles, half plain language composed from its
# grammar; gold label kept), one epoch over the rows plus as many injected copies, lower learning
# rates, distilled from stage 1 (an injected copy learns stage 1's soft labels for its clean row),
# exporting the moving average of the weights (decay 0.995 per step); about 9 min of teacher
# scores, once, then 60 min on 2 CPU cores. STAGE2_FROM: every stage-2 run's flags but the
# epochs, from the stage 1 given as $(1).
# A soup and what it needs to be served: the uniform soup of the routers in $(1), written to
# $(2), then its calibration and threshold fitted and its evaluation written beside it.
define SOUP
$(BIN)/thinfleet soup $(addsuffix /manifest.json,$(1)) --out $(2)
$(BIN)/thinfleet calibrate --manifest $(2)/manifest.json
$(BIN)/thinfleet eval --manifest $(2)/manifest.json --out $(2)
endef
TRAIN_BANKING77 := $(BIN)/thinfleet train $(BANKING77) --taxonomy banking77 --label-column category
STAGE2_FROM = --init-from $(1) --distill-from $(1)/manifest.json --injection-augment 1.0 \
  --lora-lr 2e-4 --head-lr 1e-3 --injection-grammar 0.5 --weight-average-decay 0.995
GOLD_HEADERS := --injection-headers 0.6 --injection-header-gold 0.5
train-robust: install-train
	$(TRAIN_BANKING77) --out $(ROBUST) $(call STAGE2_FROM,$(STAGE1)) --epochs 1.0

# The soup's second ingredient (docs/experiments/security.md, "The header grammar"): the same stage 2 with gold-label
# headers (about 60 min on 2 CPU cores; not stored, the soup's manifest pins its adapter's
# sha256 and recipe). Then the shipped router: the uniform soup of the two (exact mean of their
# LoRA updates and heads, deterministic, under a second), calibrated on the validation rows and
# evaluated there (about 3 min); the demo merges it to Q4_K_M.
HEADERS_ROUTER := var/train/stage2-goldheaders-1ep
$(HEADERS_ROUTER)/manifest.json:
	$(TRAIN_BANKING77) --out $(HEADERS_ROUTER) $(call STAGE2_FROM,$(STAGE1)) --epochs 1.0 \
	  $(GOLD_HEADERS)

# A third stage 2 (the eighteenth session, docs/experiments/security.md, "The accounts grammar"): the
# gold-header run's command plus second-hand and earlier accounts naming a label (30 % of the
# attacked copies, half naming the gold label); about 55 min on 2 CPU cores, not stored.
ACCOUNTS_ROUTER := var/train/stage2-accounts-1ep
$(ACCOUNTS_ROUTER)/manifest.json:
	$(TRAIN_BANKING77) --out $(ACCOUNTS_ROUTER) $(call STAGE2_FROM,$(STAGE1)) --epochs 1.0 \
	  $(GOLD_HEADERS) --injection-accounts 0.3 --injection-account-gold 0.5

# Issue 13's capacity trial (docs/experiments/fine-tuning.md): stage 1 with LoRA rank 32 instead of 16, alpha
# kept at 32 as Hu et al. (2021) keep it across ranks; all else the recipe's defaults. About
# 1 h 20 min on 2 CPU cores (75 min of training measured), not stored.
RANK32_STAGE1 := var/train/stage1-r32
$(RANK32_STAGE1)/manifest.json:
	$(TRAIN_BANKING77) --out $(RANK32_STAGE1) --lora-r 32

# Issue 13's objective trial: stage 1 with R-Drop (Liang et al. 2021: each batch twice under
# dropout, plus their symmetric KL; weight 0.5 here is the paper's alpha = 1) and LoRA dropout
# 0.1 (the paper's dropout rate; 0.05 by default) so the two passes differ. About twice stage
# 1's time (3.5-6 s a step, 1 h 40 min - 2 h 50 min of training on 2 CPU cores); resumable.
# Stored (7.6 MB), since its stage 2 pair starts from it and it costs hours to rebuild.
RDROP_STAGE1 := models/trained/banking77-gemma3-270m-lora-rdrop
$(RDROP_STAGE1)/manifest.json:
	$(TRAIN_BANKING77) --out $(RDROP_STAGE1) --rdrop-weight 0.5 --lora-dropout 0.1

# The R-Drop stage 2 pair (docs/experiments/security.md, "R-Drop and the floor of harmless
# words"): `make train-robust`'s command and the gold-header run's, each started from and
# distilled from the R-Drop stage 1 instead of the shipped one (about 55 min each on 2 CPU cores,
# resumable; both stored). Their soup, measured for issues 12 and 13, serves 92.9 % merged, one
# ticket short of its rule; the cross soup (the shipped robust stage 2 + the R-Drop stage 2)
# serves 93.2 % but fails the injection part (docs/experiments/security.md). Neither ships.
RDROP_ROBUST := models/trained/banking77-gemma3-270m-lora-rdrop-robust
$(RDROP_ROBUST)/manifest.json: $(RDROP_STAGE1)/manifest.json
	$(TRAIN_BANKING77) --out $(RDROP_ROBUST) $(call STAGE2_FROM,$(RDROP_STAGE1)) --epochs 1.0
RDROP_HEADERS := models/trained/banking77-gemma3-270m-lora-rdrop-goldheaders
$(RDROP_HEADERS)/manifest.json: $(RDROP_STAGE1)/manifest.json
	$(TRAIN_BANKING77) --out $(RDROP_HEADERS) $(call STAGE2_FROM,$(RDROP_STAGE1)) --epochs 1.0 \
	  $(GOLD_HEADERS)
RDROP_SOUP := var/soup/rdrop
$(RDROP_SOUP)/manifest.json: $(RDROP_ROBUST)/manifest.json $(RDROP_HEADERS)/manifest.json
	$(call SOUP,$(RDROP_ROBUST) $(RDROP_HEADERS),$(RDROP_SOUP))
# The twenty-fifth session's trial (docs/experiments/security.md, "The twenty-fifth session"): the
# R-Drop stage 2 again with another training order (--order-seed: same split, same validation
# rows), then the soup of the two, whose merged LoRA update has rank 32 (about 55 min + 3 min).
# Measured: the second order 92.9 % merged, the pair 92.8 %, each short of the shipped soup's
# 93.3 %; neither ships. The 99 %-precision coverage moved 60 -> 32 % between the two orders.
RDROP_ROBUST_B := var/train/rdrop-robust-order14
$(RDROP_ROBUST_B)/manifest.json: $(RDROP_STAGE1)/manifest.json
	$(TRAIN_BANKING77) --out $(RDROP_ROBUST_B) $(call STAGE2_FROM,$(RDROP_STAGE1)) --epochs 1.0 \
	  --order-seed 14
# The twenty-eighth session's trial (docs/experiments/security.md, "The twenty-eighth session"):
# a third training order, then the rank-48 uniform soup of the three orders. Measured: order 15
# alone 927 of 1,001, the trio 930 merged to Q8_0 against the pair's 932; it does not ship.
RDROP_ROBUST_C := var/train/rdrop-robust-order15
$(RDROP_ROBUST_C)/manifest.json: $(RDROP_STAGE1)/manifest.json
	$(TRAIN_BANKING77) --out $(RDROP_ROBUST_C) $(call STAGE2_FROM,$(RDROP_STAGE1)) --epochs 1.0 \
	  --order-seed 15
RDROP_TRIO := var/soup/rdrop-trio
$(RDROP_TRIO)/manifest.json: $(RDROP_ROBUST)/manifest.json $(RDROP_ROBUST_B)/manifest.json \
  $(RDROP_ROBUST_C)/manifest.json
	$(call SOUP,$(RDROP_ROBUST) $(RDROP_ROBUST_B) $(RDROP_ROBUST_C),$(RDROP_TRIO))
# The twenty-eighth session's second trial (docs/experiments/security.md, "The accounts grammar
# on the R-Drop stage 1"): the shipped pair's first ingredient's command (default order) plus the
# accounts grammar, as the eighteenth session added it to stage 2 (47 min on 2 cores). Measured:
# 928 of 1,001 merged to Q8_0 (the pair: 932; the rule: 929); it does not ship alone. Stored as
# the accounts pair's first ingredient (the twenty-ninth session's rebuild: 927 as an adapter again).
RDROP_ACCOUNTS := models/trained/banking77-gemma3-270m-lora-rdrop-accounts
$(RDROP_ACCOUNTS)/manifest.json: $(RDROP_STAGE1)/manifest.json
	$(TRAIN_BANKING77) --out $(RDROP_ACCOUNTS) $(call STAGE2_FROM,$(RDROP_STAGE1)) --epochs 1.0 \
	  --injection-accounts 0.3 --injection-account-gold 0.5
# A smaller accounts share, more of it naming the gold label (the thirty-first session,
# docs/experiments/security.md, "A smaller accounts share"): the accounts run's command with
# 15 % of the attacked copies taking an account instead of 30 %, two in three naming the gold
# label instead of one in two; alone and souped with order 14 as the accounts pair is.
# Measured: the soup serves 932 of 1,001 merged to Q8_0 (the accounts pair 930) but 46 of the 59
# held-out styles at 400 tickets meet both targets (the pair 47; the rule 47): not shipped.
RDROP_ACCOUNTS_SMALL := var/train/rdrop-accounts-015
$(RDROP_ACCOUNTS_SMALL)/manifest.json: $(RDROP_STAGE1)/manifest.json
	$(TRAIN_BANKING77) --out $(RDROP_ACCOUNTS_SMALL) $(call STAGE2_FROM,$(RDROP_STAGE1)) --epochs 1.0 \
	  --injection-accounts 0.15 --injection-account-gold 0.67
ACCOUNTS_SMALL_PAIR := var/soup/accounts-015-pair
$(ACCOUNTS_SMALL_PAIR)/manifest.json: $(RDROP_ACCOUNTS_SMALL)/manifest.json $(RDROP_ROBUST_B)/manifest.json
	$(call SOUP,$(RDROP_ACCOUNTS_SMALL) $(RDROP_ROBUST_B),$(ACCOUNTS_SMALL_PAIR))
# The thirty-third session's soups (docs/experiments/security.md, "The gold-header run in the
# soup"): the accounts run with the stored R-Drop gold-header run, and with order 14 as well; no
# training, seconds to build, about 5 min each to calibrate and evaluate. Measured: 927 and 929 of
# 1,001 merged to Q8_0 (the rule: 930); the trio at 400 tickets meets both targets on 49 of the
# 59 held-out styles (the pair 47) but flips more (1.44 against 1.10 %): neither ships.
HEADERS_PAIR := var/soup/accounts-goldheaders
$(HEADERS_PAIR)/manifest.json: $(RDROP_ACCOUNTS)/manifest.json $(RDROP_HEADERS)/manifest.json
	$(call SOUP,$(RDROP_ACCOUNTS) $(RDROP_HEADERS),$(HEADERS_PAIR))
HEADERS_TRIO := var/soup/accounts-goldheaders-order14
$(HEADERS_TRIO)/manifest.json: $(RDROP_ACCOUNTS)/manifest.json $(RDROP_HEADERS)/manifest.json \
  $(RDROP_ROBUST_B)/manifest.json
	$(call SOUP,$(RDROP_ACCOUNTS) $(RDROP_HEADERS) $(RDROP_ROBUST_B),$(HEADERS_TRIO))
# The shipped router's recipe is `make router` below (the accounts pair).
RDROP_PAIR := var/soup/rdrop-pair
$(RDROP_PAIR)/manifest.json: $(RDROP_ROBUST)/manifest.json $(RDROP_ROBUST_B)/manifest.json
	$(call SOUP,$(RDROP_ROBUST) $(RDROP_ROBUST_B),$(RDROP_PAIR))
CROSS_SOUP := var/soup/cross-A
$(CROSS_SOUP)/manifest.json: $(ROBUST)/manifest.json $(RDROP_ROBUST)/manifest.json
	$(call SOUP,$(ROBUST) $(RDROP_ROBUST),$(CROSS_SOUP))

# The twenty-second session's trial (docs/experiments/security.md, "R-Drop at stage 2 alone"):
# R-Drop added at stage 2 only, from the shipped stage 1, half an epoch (the doubled passes cost
# about one stage-2 epoch: 44 min on 2 CPU cores). Less robust than the robust stage 2; not stored.
RDROP_ONLY_ROUTER := var/train/stage2-rdrop-only-0.5ep
$(RDROP_ONLY_ROUTER)/manifest.json:
	$(TRAIN_BANKING77) --out $(RDROP_ONLY_ROUTER) $(call STAGE2_FROM,$(STAGE1)) --epochs 0.5 \
	  --rdrop-weight 0.5 --lora-dropout 0.1
# The twenty-sixth session's trial (docs/experiments/security.md, "The twenty-sixth session"): the
# same from the shipped stage 1 for a full epoch, so R-Drop sees every row and injected copy once
# (72 min of training on 2 CPU cores). Measured: 934 of 1,001 merged to Q4_K_M, but under attack
# no better than the shipped soup (31 against 36 of 59 styles); not stored, not shipped.
RDROP_ONLY_1EP := var/train/stage2-rdrop-only-1ep
$(RDROP_ONLY_1EP)/manifest.json:
	$(TRAIN_BANKING77) --out $(RDROP_ONLY_1EP) $(call STAGE2_FROM,$(STAGE1)) --epochs 1.0 \
	  --rdrop-weight 0.5 --lora-dropout 0.1

soup: install-train $(HEADERS_ROUTER)/manifest.json
	$(call SOUP,$(ROBUST) $(HEADERS_ROUTER),$(SOUP_ROUTER))

# The shipped router, the accounts pair (docs/experiments/security.md, "The accounts pair's
# gate"; shipped since the thirtieth session): the uniform soup of the stored R-Drop stage 2 with
# the accounts grammar and the R-Drop stage 2's second training order (the soup step is
# deterministic). Merged to Q8_0 it routes 930 of the 1,001 validation rows, out-of-fold ECE
# 0.010, and at 400 tickets 47 of the 59 held-out guard-blind styles meet both of issue 12's
# targets (mean flips 1.10 %), against the R-Drop pair's 932, 43 and 1.35 %. The order-14
# ingredient is its training (47 min on 2 CPU cores) or, exactly, the second half of the stored
# R-Drop pair's rank-32 soup (training/soup.py stacks the factors).
router: install-train $(RDROP_ACCOUNTS)/manifest.json $(RDROP_ROBUST_B)/manifest.json
	$(call SOUP,$(RDROP_ACCOUNTS) $(RDROP_ROBUST_B),$(ROUTER))

# Pruned routers (issue 16): the base model's first K blocks, the stage-2 router's LoRA of those
# blocks as the start, a new head, 1 epoch, distilled from it merged as the fleet served it
# then (README, "Pruning and distillation"; K=9: about 30 min on 2 CPU cores).
K ?= 9
train-pruned: install-train
	$(TRAIN_BANKING77) \
	  --out models/trained/banking77-gemma3-270m-$(K)blocks --layers $(K) --init-from $(ROBUST) \
	  --epochs 1 --distill-from $$($(BIN)/python -c \
	    "from pathlib import Path; from thinfleet.demo import merged_router; \
	     print(merged_router(Path('$(ROBUST)/manifest.json'), 'Q4_K_M'))")

# The pruning/distillation frontier table (README): every router under models/trained with
# "blocks" in its name beside the shipped one, 1 and 2 threads, floors, and the fleet.
frontier: install
	$(BIN)/python -m bench.frontier --reps 5 --tickets 12 --fleet

# Prompt injection, per style, against the shipped router as the fleet serves it, merged
# (README, "Security"; every style, 200 tickets: about 50 min on 2 CPU cores).
injection: install
	$(BIN)/thinfleet injection --manifest $$($(BIN)/python -c \
	  "from thinfleet.demo import merged_router; print(merged_router())") \
	  --out var/injection/router

# The shipped router on the held-out validation split, beside the TF-IDF baseline.
eval: install
	$(BIN)/thinfleet eval --manifest $(ROUTER)/manifest.json --out var/eval/router

# The ecommerce router (issue 14): label head plus the two fields, trained on
# data/ecommerce/train.jsonl (5 epochs, about 15 min on 2 CPU cores).
ECOMMERCE_ROUTER := models/trained/ecommerce-gemma3-270m-lora
train-ecommerce: install-train
	$(BIN)/thinfleet train data/ecommerce/train.jsonl --taxonomy ecommerce \
	  --label-column issue_classification --max-ticket-tokens 128 --validation-fraction 0.2 \
	  --epochs 5 --out $(ECOMMERCE_ROUTER)

# The ecommerce router and the base model (few-shot, span-constrained) on the held-out test
# split: label and field metrics beside TF-IDF and the trivial field baselines.
eval-ecommerce: install
	$(BIN)/thinfleet eval --manifest $(ECOMMERCE_ROUTER)/manifest.json --taxonomy ecommerce \
	  --data data/ecommerce/test.jsonl --label-column issue_classification \
	  --train-data data/ecommerce/train.jsonl --train-label-column issue_classification \
	  --out var/eval/ecommerce-router
	$(BIN)/thinfleet eval --taxonomy ecommerce \
	  --data data/ecommerce/test.jsonl --label-column issue_classification \
	  --train-data data/ecommerce/train.jsonl --train-label-column issue_classification \
	  --out var/eval/ecommerce-base

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/helm lint --strict helm/thinfleet

# The speed tables in the README (each takes minutes; run them on an otherwise idle machine).
bench: install
	$(BIN)/pip install -q -e '.[dev,bench]'
	$(BIN)/python -m bench.embeddings_tax --tickets 1001 --threads 2
	$(BIN)/python -m bench.routing --reps 5 --tickets 12
	$(BIN)/python -m bench.fleet --reps 5 --tickets 60

# The fault suite (README "Delivery under faults"): real Redis, S3, workers and model; ~10 min.
faults: install
	$(BIN)/python -m bench.faults --tickets 150

# Render the chart as the tests do (default values); e.g. `make chart VALUES=helm/thinfleet/ci/tls-values.yaml`.
VALUES ?=
chart: install
	$(BIN)/helm template thinfleet helm/thinfleet $(if $(VALUES),-f $(VALUES))

pytest: install
	$(BIN)/pytest

test: lint pytest

schema: install
	$(BIN)/thinfleet schema --out models/schemas

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
