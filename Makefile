# make test | make train | make kfold | make submission | make evaluate | make bench | make clean
# PYTHON=python make train   uses the current interpreter instead of creating .venv (e.g. in a Kaggle kernel)

PYTHON   ?= .venv/bin/python
DATA_DIR ?= data
EPOCHS   ?= 50
DEVICE   ?= auto

# Only the default interpreter is ours to create; one given on the command line is used as it is.
VENV := $(if $(filter .venv/bin/python,$(PYTHON)),.venv/bin/python)

.PHONY: test train clean

$(VENV): requirements.txt
	python3 -m venv .venv
	.venv/bin/pip install --quiet --upgrade pip
	.venv/bin/pip install --quiet -r requirements.txt
	touch $@

test: $(VENV)
	$(PYTHON) -m pytest -q tests

train: $(VENV)
	$(PYTHON) train_cnn.py --data-dir $(DATA_DIR) --epochs $(EPOCHS) --device $(DEVICE)

clean:
	rm -rf .venv .pytest_cache __pycache__ tests/__pycache__ CNN_best_model.* models reports submission.csv
