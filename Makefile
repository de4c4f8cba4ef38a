# make test | make train | make kfold | make submission | make evaluate | make demo | make bench | make gpu-check | make clean
# PYTHON=python make train   uses the current interpreter instead of creating .venv (e.g. in a Kaggle kernel)
# ARGS="..."                  more flags for train_cnn.py (make train) or train_kfold.py (make kfold, make submission)

PYTHON    ?= .venv/bin/python
DATA_DIR  ?= $(or $(MNIST_DATA_DIR),data)
DEVICE    ?= auto
EPOCHS    ?=
BUDGET    ?=
KAGGLE    := $(if $(wildcard /kaggle/input/digit-recognizer/train.csv),/kaggle/input/digit-recognizer,data/digit-recognizer)
TRAIN_CSV ?= $(KAGGLE)/train.csv
TEST_CSV  ?= $(KAGGLE)/test.csv
LABELS    ?= $(dir $(TEST_CSV))test_labels.csv
ARCHS     ?= resnet widecnn
FOLDS     ?= 0 1 2 3 4
NPROC     ?= 1
WEIGHTS   ?=
ARGS      ?=
GPU_CHECK ?= gpu-check

# Only the default interpreter is ours to create; one given on the command line is used as it is.
VENV := $(if $(filter .venv/bin/python,$(PYTHON)),.venv/bin/python)
DEMO_VENV := $(if $(VENV),.venv/demo-requirements.installed)
# Each script has its own default number of epochs (50 for train, 30 for kfold); EPOCHS overrides both, and
# BUDGET (90s, 10m, 2h) trains for that long instead (make train BUDGET=3m writes CNN_budget_3m.pth).
LENGTH_FLAGS := $(if $(EPOCHS),--epochs $(EPOCHS))$(if $(BUDGET), --budget $(BUDGET))
KFOLD := $(if $(filter 1,$(NPROC)),$(PYTHON),$(PYTHON) -m torch.distributed.run --standalone --nproc_per_node=$(NPROC))

.PHONY: test train kfold submission evaluate demo bench gpu-check clean

$(VENV): requirements.txt
	python3 -m venv .venv
	.venv/bin/pip install --quiet -r requirements.txt
	touch $@

# Gradio and the browser test's packages are optional: only make demo installs them.
$(DEMO_VENV): requirements-demo.txt $(VENV)
	.venv/bin/pip install --quiet -r requirements-demo.txt
	touch $@

# One test process per core (pytest-xdist), each file on one, with one thread each: the suite is mostly process
# starts and small runs, which one core does as fast as two.
test: $(VENV)
	OMP_NUM_THREADS=1 $(PYTHON) -m pytest -q -n auto --dist loadfile tests

TRAIN := $(PYTHON) train_cnn.py --data-dir $(DATA_DIR) $(LENGTH_FLAGS) --device $(DEVICE) $(ARGS)

train: $(VENV)
	$(TRAIN)

# make evaluate and make demo read with pipeline A's CNN_best_model.pth when it is here, else with the released model
# in weights/ (the scripts say which); WEIGHTS=... picks any other.
WEIGHTS_FLAG := $(if $(WEIGHTS),--weights $(WEIGHTS))

# Without a Kaggle download, MNIST is exported in Kaggle's format (train.csv, test.csv, test_labels.csv).
# A pattern rule with two targets is made by one run of its recipe, in every version of make.
data/%/train.csv data/%/test.csv: | $(VENV)
	$(PYTHON) data.py export-kaggle --data-dir $(DATA_DIR) --out data/$*

kfold: $(VENV) $(TRAIN_CSV)
	$(KFOLD) train_kfold.py --train-csv $(TRAIN_CSV) --archs $(ARCHS) --folds $(FOLDS) $(LENGTH_FLAGS) --device $(DEVICE) $(ARGS)

submission: kfold $(TEST_CSV)
	$(PYTHON) predict_tta.py --test-csv $(TEST_CSV) --weights models --out submission.csv --device $(DEVICE) \
		$(if $(wildcard $(LABELS)),--labels $(LABELS))

evaluate: $(VENV)
	$(PYTHON) evaluate.py $(WEIGHTS_FLAG) --data-dir $(DATA_DIR) --device $(DEVICE)

demo: $(VENV) $(DEMO_VENV)
	$(PYTHON) predict_tta.py $(WEIGHTS_FLAG) --demo --device $(DEVICE)

bench: $(VENV)
	$(PYTHON) tools/bench.py --data-dir $(DATA_DIR) --out bench.json

# A GPU's first run: every device path in about 4 minutes; the report is $(GPU_CHECK)/gpu_check.json (README, GPUs and Macs).
gpu-check: $(VENV)
	$(PYTHON) tools/gpu_check.py --data-dir $(DATA_DIR) --device $(DEVICE) --out $(GPU_CHECK)

clean:
	rm -rf .venv .pytest_cache __pycache__ tests/__pycache__ tools/__pycache__ CNN_best_model.* CNN_budget_* models reports submission.csv bench.json $(GPU_CHECK)
