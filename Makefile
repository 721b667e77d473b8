# make demo: install, write the Fashion-MNIST .beton files, train SimCLR for 6 minutes on the
#            CPU, probe it and three random inits, print the table.
# make previews: augmentation previews (runs/views_simclr.png, runs/views_byol.png).
# make test: install, run the test suite.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DATA   := data

.PHONY: install data demo previews test bench clean
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
	$(PY) benchmarks/bench_fashion_mnist.py --quick

previews: install $(DATA)/fashion-mnist_train.beton
	$(PY) ffcv_ssl_common.py --beton $(DATA)/fashion-mnist_train.beton --preset simclr --out runs/views_simclr.png
	$(PY) ffcv_ssl_common.py --beton $(DATA)/fashion-mnist_train.beton --preset byol --out runs/views_byol.png

test: install
	$(PY) -m pytest -q

bench: install $(DATA)/fashion-mnist_train.beton
	$(PY) benchmarks/bench_loader.py
	$(PY) benchmarks/bench_fashion_mnist.py

clean:
	rm -rf $(VENV) __pycache__ tests/__pycache__ runs
