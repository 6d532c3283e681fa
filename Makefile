# CPU set-up and the project's everyday commands.
# `make demo` and `make test` each create the virtual environment when it
# is missing, so a fresh clone needs nothing else.

VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch lies on this machine's disk; an unpinned torch
# would pull a multi-GB CUDA build.
CPU_TORCH := torch==2.13.0 torchaudio==2.11.0
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint bench clean

venv: $(STAMP)

$(STAMP): setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(CPU_TORCH)
	# torchaudio 2.11's C++ extensions are linked against CUDA; without
	# them it imports as pure Python, which is all SpeechBrain needs here.
	rm -f $$($(PY) -c "import sysconfig; \
	print(sysconfig.get_paths()['purelib'])")/torchaudio/lib/*.so
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) recipes/VoxCeleb/SpeakerRec/demo.py --output demo_output

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/yamllint hparams recipes

bench: $(STAMP)
	$(PY) benchmarks/bench_cost.py --out bench_output/cost.json
	$(PY) benchmarks/bench_scoring.py --out bench_output/scoring.json
	$(PY) benchmarks/bench_quality.py --out bench_output/quality.json

clean:
	rm -rf $(VENV) demo_output bench_output
