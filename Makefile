# make demo: install, write the Fashion-MNIST .beton files, preview the augmentations, train
#            SimCLR briefly on the CPU, probe it and a random init, print both.
# make test: install, run the test suite.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DATA   := data

.PHONY: install data demo test bench clean
install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt tools/install_system_deps.sh
	PYTHON=$(PYTHON) bash tools/install_system_deps.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(DATA)/fashion-mnist_train.beton: | install
	$(PY) write_beton.py --out-dir $(DATA)

data: $(DATA)/fashion-mnist_train.beton

demo: install $(DATA)/fashion-mnist_train.beton
	$(PY) ffcv_ssl_common.py --beton $(DATA)/fashion-mnist_train.beton --preset simclr --out runs/views_simclr.png
	$(PY) ffcv_ssl_common.py --beton $(DATA)/fashion-mnist_train.beton --preset byol --out runs/views_byol.png
	$(PY) benchmarks/bench_fashion_mnist.py --quick

test: install
	$(PY) -m pytest -q

bench: install $(DATA)/fashion-mnist_train.beton
	$(PY) benchmarks/bench_loader.py
	$(PY) benchmarks/bench_fashion_mnist.py

clean:
	rm -rf $(VENV) __pycache__ tests/__pycache__ runs
