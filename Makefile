# Tributary: `make train` runs the default job, `make test` the test suite.
# Both create .venv and install requirements.txt when missing; `make test` adds requirements-test.txt.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cksum < requirements.txt | cut -d' ' -f1)
TEST_STAMP := $(VENV)/.installed-test-$(shell cksum < requirements-test.txt | cut -d' ' -f1)

NPROC  ?= 2
RUNS   ?= runs/autoregressive
MODELS := factorized fvsbn nade made
# 2 CPU ranks over gloo. Without ACCELERATE_USE_CPU=1, --multi_gpu on a CPU machine starts
# independent single-process runs, and --cpu starts only one process (docs/platform-notes.md).
LAUNCH := ACCELERATE_USE_CPU=1 $(VENV)/bin/accelerate launch --multi_gpu --num_processes $(NPROC) \
          --num_machines 1 --mixed_precision no --dynamo_backend no -m launch.train

.PHONY: venv data data-lm data-lm-4k data-lm-bpe data-shapes data-detr data-oad smoke train train-sd train-detr train-oad test lint drills fault-drills \
        slurm-up slurm-down clean

venv: $(STAMP)
$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch==2.13.0 is in the same pip command as everything else (a CPU wheel here)
	$(PY) -m pip install --quiet -r requirements.txt
	rm -f $(VENV)/.installed-*
	touch $@

# what only the tests need; reinstalled when it changes, or after requirements.txt did
# (the stamp above removes this one too)
$(TEST_STAMP): requirements-test.txt $(STAMP)
	$(PY) -m pip install --quiet -r requirements-test.txt
	rm -f $(VENV)/.installed-test-*
	touch $@

data: venv
	$(PY) -m launch.make_shards digits --out data/digits

# byte windows of the Python standard library for configs/lm/ (1k, 4k, 16k, 64k contexts);
# data-lm-4k only those of 4k (make train)
data-lm-4k: venv
	$(PY) -m launch.make_shards text stdlib --seq-len 4096 --out data/lm/stdlib-4k

data-lm: venv
	@for n in 1024:1k 4096:4k 16384:16k 65536:64k; do \
	  $(PY) -m launch.make_shards text stdlib --seq-len $${n%%:*} --out data/lm/stdlib-$${n##*:} || exit 1; \
	done

# subword windows of the standard library (1k and 4k tokens): a 4096-id byte-level BPE trained on
# its train split (once, deterministically: the same standard library gives the same file), then its windows
data-lm-bpe: venv
	$(PY) -m launch.make_shards tokenizer stdlib --vocab-size 4096 --out data/lm/bpe/tokenizer.json
	@for n in 1024:1k 4096:4k; do \
	  $(PY) -m launch.make_shards text stdlib --seq-len $${n%%:*} --tokenizer data/lm/bpe/tokenizer.json \
	    --out data/lm/bpe-$${n##*:} || exit 1; \
	done

# captioned 32x32 shapes for text-to-image, with the CLIP BPE tokenizer trained on their captions
data-shapes: venv
	$(PY) -m launch.make_shards shapes --out data/shapes

# shapes scenes with boxes for DETR; frame-feature streams as windows for OadTR
data-detr: venv
	$(PY) -m launch.make_shards detection --out data/shapes-det

data-oad: venv
	$(PY) -m launch.make_shards action-streams --out data/action-streams

# the four density models on the digits, then their test NLLs side by side
smoke: data
	@for m in $(MODELS); do \
	  echo "== $$m"; \
	  $(LAUNCH) --config configs/autoregressive/$$m.yaml run.dir=$(RUNS)/$$m || exit 1; \
	done
	$(PY) -m launch.report $(addprefix $(RUNS)/,$(MODELS))

# the default job: a long-range LM (FLASH beside softmax on 4k bytes of context, the same
# training time each) and text-to-image latent diffusion (a short autoencoder stage, its
# latents, then the UNet), each on 2 CPU ranks; then one table of their headline metrics.
# Run again, each run resumes from its final checkpoint and only reports.
DEMO := runs/demo
train: data-lm-4k data-shapes
	$(LAUNCH) --config configs/demo/lm_softmax.yaml
	$(LAUNCH) --config configs/demo/lm_flash.yaml
	$(LAUNCH) --config configs/demo/sd_vae.yaml
	test -f $(DEMO)/sd_vae/latents/val/manifest.json || \
	  $(PY) -m launch.make_shards latents data/shapes --vae $(DEMO)/sd_vae/vae --out $(DEMO)/sd_vae/latents
	$(LAUNCH) --config configs/demo/sd.yaml
	$(PY) -m launch.report --headline $(DEMO)/lm_softmax $(DEMO)/lm_flash $(DEMO)/sd

# tiny Stable Diffusion from scratch: the autoencoder stage, its latents of the shapes
# (once), then the UNet on them
train-sd: data-shapes
	$(LAUNCH) --config configs/sd/tiny_vae.yaml
	test -f data/shapes-latents/val/manifest.json || \
	  $(PY) -m launch.make_shards latents data/shapes --vae runs/sd/tiny_vae/vae --out data/shapes-latents
	$(LAUNCH) --config configs/sd/tiny.yaml

# DETR on the shapes scenes (test-split map50 / map50_95 in runs/detr/shapes/final_metrics.json)
train-detr: data-detr
	$(LAUNCH) --config configs/detr/shapes.yaml

# OadTR and its GRU baseline on the same streams, then their test-split frame mAP side by side
train-oad: data-oad
	$(LAUNCH) --config configs/oadtr/oadtr.yaml
	$(LAUNCH) --config configs/oadtr/gru.yaml
	$(PY) -m launch.report --metrics frame_map runs/oadtr/oadtr runs/oadtr/gru

# the linter, then the suite without the long drills (about 20 minutes on 2 cores); `make drills` runs those
test: lint
	$(PY) -m pytest -q -m "not drill" --durations=25 tests

# ruff's lint rules and its formatter, as configured in pyproject.toml; `ruff format .` fixes the layout
lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# every long drill: the fault drills at full strength (tests/drills/README.md), then the rest
drills: fault-drills
	$(PY) -m pytest -q -m drill tests --ignore=tests/drills

fault-drills: $(TEST_STAMP)
	rm -f runs/drills/report.jsonl
	TRIBUTARY_DRILL_TRIALS=10 TRIBUTARY_DRILL_REPORT=runs/drills/report.jsonl $(PY) -m pytest -q tests/drills
	@cat runs/drills/report.jsonl

# a one-machine SLURM cluster on 127.0.0.1 (root; Debian's slurm-wlm and munge) to try
# slurm/*.sbatch and launch.submit --cpu; then export SLURM_CONF=/tmp/tributary-slurm/slurm.conf
# a SLURM cluster on this machine, as root: SLURM_NODES=2 gives two nodes with their own addresses
SLURM_NODES ?= 1
slurm-up:
	slurm/loopback.sh --nodes $(SLURM_NODES)

slurm-down:
	slurm/loopback.sh stop

clean:
	rm -rf runs data
