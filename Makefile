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

test: venv
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) runs
