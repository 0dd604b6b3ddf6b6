# The two set-up commands of the README: `make demo` and `make test`.
# Both create .venv if missing, install omnilab into it (idempotent: a stamp file skips
# the install when pyproject.toml has not changed), then run.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.omnilab-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export GRADIO_ANALYTICS_ENABLED := False
export RAY_USAGE_STATS_ENABLED := 0
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test lab chat install lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch/torchvision are pinned to releases that pip finds on local disk on our machines
# (a CUDA build that also runs on the CPU); pyproject admits a range.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/omnilab demo --model organism

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests notebooks --nbmake --nbmake-timeout=900

lab: $(STAMP)
	$(BIN)/jupyter lab --ip 127.0.0.1 $(if $(filter 0,$(shell id -u)),--allow-root,) notebooks

chat: $(STAMP)
	$(BIN)/omnilab chat --model tiny --text "Describe what you hear and see." \
		--audio data/speech.wav --image data/image.png --video data/video.mp4 --out reply.wav

lint: $(STAMP)
	$(BIN)/ruff check omnilab apps tests
	$(BIN)/ruff format --check omnilab apps tests

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

# Train the organism (the tiny preset on omnilab.organism's world, ~11 min on 2 free cores; resumable)
# and install its weights into the package, where omnilab.load("organism") reads them.
.PHONY: organism
organism: $(STAMP)
	$(BIN)/omnilab train organism --out organism-run --install
