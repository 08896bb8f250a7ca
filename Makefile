PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: venv test demo clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: requirements.txt | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	touch $@

venv: $(VENV)/.installed

# tests/replicas splits the CPU into 2 logical devices, which needs a process of its own.
test: venv
	$(BIN)/python -m pytest -q tests
	$(BIN)/python -m pytest -q tests/replicas

clean:
	rm -rf $(VENV) runs

# A few-minute offline distillation on the embedded cifar10_mini: a resnet20 teacher, then a
# resnet8 student distilled with AT; both evaluated by test.py.
DEMO_DIR ?= runs/demo
DEMO_FLAGS ?= --dataset=cifar10_mini --fraction=0.25 --epochs=3 --teacher_epochs=4 --batch_size=64
demo: venv
	$(BIN)/python train.py --method=AT --arch=resnet8 --teacher_arch=resnet20 $(DEMO_FLAGS) --train_dir=$(DEMO_DIR)
	$(BIN)/python test.py --model=$(DEMO_DIR)/teacher
	$(BIN)/python test.py --model=$(DEMO_DIR)
