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
# resnet8 student distilled with AT, and the same student trained alone at the same budget; all
# three evaluated by test.py, then one table: teacher, student alone, student distilled.
DEMO_DIR ?= runs/demo
DEMO_FLAGS ?= --dataset=cifar10_mini --fraction=0.25 --epochs=3 --teacher_epochs=4 --batch_size=64
demo: venv
	$(BIN)/python train.py --method=AT --arch=resnet8 --teacher_arch=resnet20 $(DEMO_FLAGS) --train_dir=$(DEMO_DIR)
	$(BIN)/python train.py --method=none --arch=resnet8 $(DEMO_FLAGS) --train_dir=$(DEMO_DIR)_alone
	$(BIN)/python test.py --model=$(DEMO_DIR)/teacher
	$(BIN)/python test.py --model=$(DEMO_DIR)_alone
	$(BIN)/python test.py --model=$(DEMO_DIR)
	@$(BIN)/python scripts/demo_table.py $(DEMO_DIR)/teacher $(DEMO_DIR)_alone $(DEMO_DIR)
