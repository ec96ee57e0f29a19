# midigen: `make demo` and `make test` each set up .venv first, so on a fresh machine each is one command.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Pins torch to the CPU wheel on local disk on the project's build machines; `make setup CONSTRAINTS=` elsewhere.
CONSTRAINTS ?= constraints.txt
PIP_CONSTRAINT_FLAG := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)
STAMP := $(VENV)/.installed

.PHONY: setup audio demo test bench clean

setup: $(STAMP) audio

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(PIP_CONSTRAINT_FLAG) -e '.[test]'
	touch $(STAMP)

# FluidSynth and a General MIDI SoundFont for WAV rendering, where apt is available; never fatal.
audio:
	@command -v fluidsynth >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    (apt-get install -y -qq fluidsynth fluid-soundfont-gm >/dev/null 2>&1 || \
	     (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq fluidsynth fluid-soundfont-gm >/dev/null 2>&1)) \
	    || echo "make setup: could not install fluidsynth; WAV rendering will be unavailable"; \
	  else echo "make setup: fluidsynth not found (install it for WAV rendering)"; fi; }

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
