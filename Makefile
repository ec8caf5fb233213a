# Two commands on a fresh machine: `make demo` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
DEMO := demo

.PHONY: demo test venv browser clean

$(VENV)/.installed: requirements.txt requirements-nodeps.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

venv: $(VENV)/.installed

# The main job: MiniLM on 2,000 balanced tweets (600 held out), max length 64, 2 epochs: four methods side by
# side at four training-set sizes (a learning curve), with baselines, 95% intervals and report.html.
# Sized to finish within 15 minutes on 2 CPU cores (measured figures are in the README).
demo: venv
	$(PY) -m tunelab data tweets --output $(DEMO)/data --train-size 2000 --eval-size 600 --seed 0
	$(PY) -m tunelab compare --model minilm --task classification \
		--train $(DEMO)/data/train.jsonl --eval $(DEMO)/data/eval.jsonl \
		--tuning scratch,head,lora,full --train-fractions 0.1,0.25,0.5,1.0 --output $(DEMO)/compare \
		--epochs 2 --batch-size 32 --max-length 64 --seed 0 --train.progress false \
		--method-set scratch:train.lr=1e-4 --method-set head:train.lr=2e-3 \
		--method-set lora:train.lr=5e-4 --method-set full:train.lr=8e-5
	@echo "open $(DEMO)/compare/report.html"

# The dashboard test drives Debian's chromium through Playwright (no browser download): install it when missing.
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
		|| (echo "the dashboard test needs Debian's chromium: apt-get install -y chromium" && false)

test: venv browser
	OMP_NUM_THREADS=2 $(PY) -m pytest -q --durations=10

clean:
	rm -rf $(VENV) $(DEMO) runs
