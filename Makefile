# fnet-distill: every target runs inside .venv, which `make install` creates from nothing.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/fnet-distill
# torch, when the venv cannot import one yet. From PyPI, `torch==2.13.0` is the CUDA build on Linux x86_64
# (several GB; it runs on a CPU too); for the CPU-only wheel pass
# TORCH_INDEX=https://download.pytorch.org/whl/cpu. A torch already importable in the venv is kept.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=

# The real run's settings live in two config files; a setting variable below (TOPK, STEPS, ALPHA, ...) is passed
# on only when you set it (make train-student STEPS=500, or in the environment), else the file's value holds.
# given(VAR,--option): "--option $(VAR)" when VAR was set on the command line or in the environment.
given = $(if $(filter-out undefined default file automatic,$(firstword $(origin $(1)))),$(2) $($(1)))

# Stage one: configs/teacher-cache-qwen2-0.5b-gsm8k.yaml (teacher, dataset, top-k, temperatures, ...).
CACHE_CONFIG ?= configs/teacher-cache-qwen2-0.5b-gsm8k.yaml
# The paths and the teacher, which other targets use too (the config files hold the same values)
TEACHER ?= Qwen/Qwen2-0.5B-Instruct
DATASET ?= openai/gsm8k
CACHE_DIR ?= runs/cache/qwen2-0.5b-gsm8k-train
VAL_CACHE_DIR ?= runs/cache/qwen2-0.5b-gsm8k-test
# Overrides, passed only when set: TEACHER DATASET SPLIT TOPK SAMPLES TEMPERATURES MAX_LENGTH BATCH_TOKENS
# CACHE_FORMAT; CACHE_ARGS: any other teacher-cache options
CACHE_ARGS ?=
CACHE_FLAGS = $(call given,TEACHER,--teacher) $(call given,DATASET,--dataset) $(call given,SPLIT,--split) \
  $(call given,TOPK,--topk) $(call given,SAMPLES,--samples) $(call given,TEMPERATURES,--temperatures) \
  $(call given,MAX_LENGTH,--max-length) $(call given,BATCH_TOKENS,--batch-tokens) \
  $(call given,CACHE_FORMAT,--format) $(CACHE_ARGS)
# Teacher-written solutions (make written-cache): solutions per training question, kept by their reference
WRITE ?= 4
WRITTEN_DIR ?= runs/cache/qwen2-0.5b-gsm8k-train-written

# Stage two: configs/train-student-qwen2-0.5b-gsm8k.yaml (student shape, steps, KD kind, alpha, temperature; why
# alpha 0.2 and temperature 1: the comment there).
TRAIN_CONFIG ?= configs/train-student-qwen2-0.5b-gsm8k.yaml
STUDENT_OUT ?= runs/student/fnet-d256-l4
# Overrides, passed only when set: STEPS KD ALPHA TEMPERATURE; TRAIN_ARGS: any other train-student options
TRAIN_ARGS ?=
TRAIN_FLAGS = $(call given,STEPS,--steps) $(call given,KD,--kd) $(call given,ALPHA,--alpha) \
  $(call given,TEMPERATURE,--temperature) $(TRAIN_ARGS)
VAL_FLAG = $(if $(wildcard $(VAL_CACHE_DIR)/manifest.json),--val-cache $(VAL_CACHE_DIR),--val-fraction 0.02)
EVAL_ARGS ?=
# Extra caches train-student mixes in (e.g. MIX_CACHES=$(WRITTEN_DIR)); every sequence of each once per epoch
MIX_CACHES ?=
# One round of offline on-policy distillation (make onpolicy-round): from ROUND_FROM, into ROUND_OUT
ROUND_FROM ?= $(STUDENT_OUT)/final
ROUND_OUT ?= runs/student/onpolicy-r1
ROUND_CACHE ?= runs/cache/onpolicy-r1
ROUND_STEPS ?= 500

DEMO_SCALE ?= 1

.PHONY: help install test lint teacher-cache val-cache written-cache onpolicy-round train-student eval-student eval-teacher demo demo-gsm8k demo-teacher bench bench-gpu study compare clean

help: ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 18

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed ## create .venv and install the project (torch==2.13.0 unless one is present)

test: install ## run the test suite (CPU, no internet)
	$(PY) -m pytest -q

lint: install ## ruff
	$(VENV)/bin/ruff check pipeline student cache tests bench

teacher-cache: install ## stage one: run the teacher once and write the sparse cache
	$(CLI) teacher-cache --config $(CACHE_CONFIG) --out $(CACHE_DIR) $(CACHE_FLAGS)

val-cache: install ## stage one on the test split (the validation cache for stage two)
	$(MAKE) teacher-cache SPLIT=test CACHE_DIR=$(VAL_CACHE_DIR)

written-cache: install ## stage one writing: the teacher writes WRITE solutions per question, keeps the correct ones
	$(CLI) teacher-cache --config $(CACHE_CONFIG) --out $(WRITTEN_DIR) --write $(WRITE) $(CACHE_FLAGS)

onpolicy-round: install ## the teacher scores the student's own answers, the student continues on them
	$(CLI) eval --model $(ROUND_FROM) --dataset $(DATASET) --split $(or $(SPLIT),train) --answers-out $(ROUND_OUT).answers.jsonl $(EVAL_ARGS)
	$(CLI) teacher-cache --config $(CACHE_CONFIG) $(CACHE_FLAGS) --dataset $(ROUND_OUT).answers.jsonl \
	  --out $(ROUND_CACHE)
	$(CLI) train-student --config $(TRAIN_CONFIG) --init-from $(ROUND_FROM) --cache $(CACHE_DIR) \
	  --cache $(ROUND_CACHE) --out $(ROUND_OUT) $(VAL_FLAG) $(TRAIN_FLAGS) --steps $(ROUND_STEPS)

train-student: install ## stage two: train the student from the cache (teacher never loaded)
	$(CLI) train-student --config $(TRAIN_CONFIG) --cache $(CACHE_DIR) $(foreach c,$(MIX_CACHES),--cache $(c)) \
	  --out $(STUDENT_OUT) $(VAL_FLAG) $(TRAIN_FLAGS)

eval-student: install ## GSM8K accuracy of the trained student (greedy, strict + flexible)
	$(CLI) eval --model $(STUDENT_OUT)/final --dataset $(DATASET) --split test --out $(STUDENT_OUT)/eval-test.jsonl $(EVAL_ARGS)

eval-teacher: install ## the same evaluation on the teacher, for comparison
	$(CLI) eval --model $(TEACHER) --dataset $(DATASET) --split test --out runs/eval/teacher-test.jsonl $(EVAL_ARGS)

demo: install ## the whole pipeline offline on the embedded default, with a report
	$(CLI) demo --out runs/demo --scale $(DEMO_SCALE)

demo-gsm8k: install ## the same flow on the real Qwen2 tokenizer + a GSM8K slice (needs ../shared)
	$(CLI) demo --out runs/demo-gsm8k --gsm8k --scale $(DEMO_SCALE)

demo-teacher: install ## retrain the shipped demo teacher from its seed (after a generator/tokenizer change)
	$(CLI) demo --rebuild-teacher

bench: install ## benchmarks (results go to bench/results/*.json; table in README)
	$(PY) bench/run_all.py

bench-gpu: install ## the GPU-only checks in one run (needs CUDA): bench/results/gpu.json
	$(PY) bench/gpu_check.py

study: install ## student quality vs cache bytes, 42 students on the demo assets (< 30 min on 2 cores): runs/study/
	$(PY) bench/study_cache_size.py --out runs/study

compare: install ## FNet vs transformer students (same params, same shape, cut from the teacher) on the demo, 3 seeds
	$(PY) bench/compare_students.py --out runs/compare

clean: ## delete runs/ (caches, students, demo reports) and .pytest_cache
	rm -rf runs .pytest_cache
