# Two commands on a fresh machine:  `make demo` (set up + run the whole flow on synthetic phantoms)
# and `make test` (set up + run the test suite). Both create the virtual environment .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_EPOCHS ?= 8
# The demo U-Net's width: 32 where training is fast (a CUDA GPU, or a CPU with native bf16), else 16, a
# quarter of the work, so the demo takes about 11 minutes instead of 40 to 50 on a 2-core CPU without bf16
# (docs/BENCHMARKS.md, "The main job"). Set it to choose: `make demo DEMO_WIDTH=32`.
DEMO_WIDTH ?= $(shell $(PY) -c "import torch; from utils.helpers import cpu_has_bf16; \
	print(32 if torch.cuda.is_available() or cpu_has_bf16() else 16)")

.PHONY: install demo test clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m data.synthetic --out data/synthetic --patients 12 --seed 0
	$(PY) -m data.preprocess --src data/synthetic --out data/processed
	$(PY) -m data.split_data --data data/processed --val 0.15 --test 0.15 --seed 0
	$(PY) train.py --data data/processed --model unet --width $(DEMO_WIDTH) --epochs $(DEMO_EPOCHS) --out checkpoints --no-progress
	$(PY) evaluate.py --checkpoint checkpoints/best_model.pth --data data/processed --split test --out checkpoints/eval-test
	$(PY) -m data.export_png --data data/processed --split test --out data/examples --n 4
	$(PY) infer.py --checkpoint checkpoints/best_model.pth --input "$$(ls data/examples/images/*.png | head -n 1)" --output prediction_mask.png
	@echo
	@echo "Outputs: phantoms data/synthetic/ | slice arrays data/processed/ (splits.json) | checkpoints/best_model.pth,"
	@echo "  last.pth, history.csv, curves.png | test metrics checkpoints/eval-test/ (results.json, per_image.csv,"
	@echo "  cases.png) | example slices data/examples/ | prediction_mask.png + prediction_mask_overlay.png"

test: install
	$(PY) -m pytest -q -n auto

clean:
	rm -rf data/synthetic data/processed data/examples checkpoints/*.pth checkpoints/eval-* \
	       checkpoints/history.csv checkpoints/curves.png prediction_mask*.png predictions
