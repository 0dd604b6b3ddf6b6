# The two set-up commands of the README: `make demo` and `make test`.
# Both create .venv if missing and install exactly the lock into it (requirements.lock: every package
# at one version, made by pip-tools from pyproject.toml's ranges; the stamp re-installs when the lock or
# pyproject.toml changes), check that the environment matches the lock, then run.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
LOCK := requirements.lock
LOCK_EXTRAS := app notebook analysis scale bench dev
STAMP := $(VENV)/.omnilab-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export GRADIO_ANALYTICS_ENABLED := False
export RAY_USAGE_STATS_ENABLED := 0
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test lab chat install lint clean lock check-env

$(BIN)/python:
	$(PY) -m venv $(VENV)

# The lock pins torch/torchvision to the releases pip finds on our machines' local disk (constraints.txt).
$(STAMP): $(LOCK) pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP) check-env
	$(BIN)/omnilab demo --model organism

test: $(STAMP) check-env
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

# Fails in seconds, in one line, naming each installed package that differs from the lock.
check-env: $(STAMP)
	$(BIN)/python scripts/check_env.py $(LOCK)

# Regenerate the lock with the newest versions pyproject.toml's ranges admit (torch/torchvision held at
# constraints.txt). To upgrade: `make lock`, then `make test`, then commit pyproject.toml and the lock.
lock: | $(BIN)/python
	$(BIN)/python -m pip install --quiet "pip-tools>=7.4"
	$(BIN)/pip-compile --quiet --upgrade $(foreach e,$(LOCK_EXTRAS),--extra $(e)) --strip-extras --allow-unsafe --no-emit-find-links \
		--no-emit-index-url -c constraints.txt -o $(LOCK) pyproject.toml

# Every notebook executed and written to HTML with static figures (plotly's offline bundle, no network),
# plus an index page: build/gallery/index.html.
.PHONY: gallery
gallery: $(STAMP)
	$(BIN)/python scripts/gallery.py --out build/gallery
