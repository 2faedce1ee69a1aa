# Two commands do all set-up on a fresh machine:  make demo  and  make test.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: pip takes the CPU build from local disk instead of a multi-GB CUDA build
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Train the default model on easy-VQA (frozen towers over the feature cache), evaluate on the test
# split, print the metrics table and an example prediction.
demo: $(STAMP)
	$(BIN)/vqakit train --config easy-vqa --train.progress false
	$(BIN)/vqakit predict --checkpoint runs/easy-vqa/checkpoint \
		--image "$$($(BIN)/python -c 'from vqakit.data.sources import easy_vqa_data_dir; print(easy_vqa_data_dir() / "test/images/0.png")')" \
		--question "what is the color of the shape?" --question+ "what shape is in the image?" --question+ "is there a red shape?"

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Needs a trained checkpoint (make demo). Writes benchmarks/results/*.json.
bench: $(STAMP)
	$(BIN)/python benchmarks/latency.py --checkpoint runs/easy-vqa/checkpoint --variants auto,int8,torch --repeats 3
	$(BIN)/python benchmarks/quantize.py --checkpoint runs/easy-vqa/checkpoint
	$(BIN)/python benchmarks/load.py --checkpoint runs/easy-vqa/checkpoint --distinct
	$(BIN)/python benchmarks/load.py --checkpoint runs/easy-vqa/checkpoint

clean:
	rm -rf runs .pytest_cache
