# make demo        install, write the Fashion-MNIST .beton files, train SimCLR for 6 minutes on the
#                  CPU (recipes/fashion-mnist-cpu.sh), probe it and three random inits, print the table
# make test        install, run the test suite
# make previews    augmentation previews (runs/views_simclr.png, runs/views_byol.png)
# make bench       the loader benchmark (benchmarks/README.md)
# make clean       remove the virtual environment and caches; runs/ and data/ are kept
# make clean-cache empty numba's compiled-code cache (__pycache__) only
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DATA   := data

.PHONY: install data demo previews test bench clean clean-cache
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

bench: install
	@echo "benchmarks/bench_loader.py: our loader against torchvision's on 3,000 generated JPEGs,"
	@echo "64-224 px, SimCLR's and BYOL's views; about 17 minutes on 2 cores (benchmarks/README.md)"
	$(PY) benchmarks/bench_loader.py

clean-cache:
	find . -name __pycache__ -type d -not -path "./$(VENV)/*" -prune -exec rm -rf {} +

clean: clean-cache
	rm -rf $(VENV) .pytest_cache
