# midigen: `make demo` and `make test` each set up .venv first, so on a fresh machine each is one command.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Pins torch to the CPU wheel on local disk on the project's build machines; `make setup CONSTRAINTS=` elsewhere.
CONSTRAINTS ?= constraints.txt
PIP_CONSTRAINT_FLAG := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)
STAMP := $(VENV)/.installed

.PHONY: setup audio browser demo test bench clean

setup: $(STAMP) audio browser

# The studio (`studio` extra) and audio prompts (`audio` extra, then basic-pitch without its dependencies, which
# would pull TensorFlow: its ONNX model runs on onnxruntime).
$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(PIP_CONSTRAINT_FLAG) -e '.[test,studio,audio]'
	$(PY) -m pip install --quiet --disable-pip-version-check $(PIP_CONSTRAINT_FLAG) --no-deps 'basic-pitch==0.4.*'
	touch $(STAMP)

# FluidSynth and a General MIDI SoundFont for WAV rendering, where apt is available; never fatal.
audio:
	@command -v fluidsynth >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    (apt-get install -y -qq fluidsynth fluid-soundfont-gm >/dev/null 2>&1 || \
	     (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq fluidsynth fluid-soundfont-gm >/dev/null 2>&1)) \
	    || echo "make setup: could not install fluidsynth; WAV rendering will be unavailable"; \
	  else echo "make setup: fluidsynth not found (install it for WAV rendering)"; fi; }

# Debian's Chromium for the studio's browser tests (Playwright drives it; it never downloads a browser), where apt
# is available; never fatal here (in CI the browser tests fail without it).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    (apt-get install -y -qq chromium >/dev/null 2>&1 || \
	     (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1)) \
	    || echo "make setup: could not install chromium; the studio's browser tests will skip (and fail in CI)"; \
	  else echo "make setup: chromium not found (install it for the studio's browser tests)"; fi; }

demo: setup
	$(VENV)/bin/midigen demo

test: setup
	$(PY) -m pytest -q

# The peers we measure against (MidiTok, x-transformers) live in the `bench` extra, not in the core install.
bench: setup
	$(PY) -m pip install --quiet --disable-pip-version-check $(PIP_CONSTRAINT_FLAG) -e '.[test,bench]'
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) out runs .pytest_cache
