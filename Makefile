# Two commands on a fresh machine: `make demo` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
DEMO := demo

.PHONY: demo test test-fast venv browser postgres clean

$(VENV)/.installed: requirements.txt requirements-nodeps.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

venv: $(VENV)/.installed

# The main job: MiniLM on 2,000 balanced tweets (600 held out), max length 64, batch 32: transfer learning (head),
# LoRA and full fine-tuning side by side at three training-set sizes (a learning curve), with baselines, 95%
# intervals and report.html. No learning rates or epochs here: each method runs with its own defaults. Sized to
# finish within 15 minutes on 2 CPU cores, install included (measured figures are in the README; adding scratch,
# what pre-training is worth, takes it to 16.6 minutes).
demo: venv
	$(PY) -m tunelab data tweets --output $(DEMO)/data --train-size 2000 --eval-size 600 --seed 0
	$(PY) -m tunelab compare --model minilm --task classification \
		--train $(DEMO)/data/train.jsonl --eval $(DEMO)/data/eval.jsonl \
		--tuning head,lora,full --train-fractions 0.1,0.3,1.0 --output $(DEMO)/compare \
		--batch-size 32 --max-length 64 --seed 0 --train.progress false
	@echo "open $(DEMO)/compare/report.html"

# The dashboard test drives Debian's chromium through Playwright (no browser download): install it when missing.
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
		|| (echo "the dashboard test needs Debian's chromium: apt-get install -y chromium" && false)

# The service's PostgreSQL tests start a real server from Debian's postgresql package (initdb and pg_ctl in a temporary
# folder, a Unix socket only): install it when missing.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq postgresql >/dev/null) \
		|| (echo "the PostgreSQL tests need Debian's postgresql: apt-get install -y postgresql" && false)

# Two workers, one thread each; whole modules go to one worker (--dist loadscope: module fixtures are built once),
# in the order tests/conftest.py gives them, longest first (xdist would otherwise order them by their test count).
PYTEST := OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadscope --no-loadscope-reorder

test: venv browser postgres
	$(PYTEST) --durations=10

# A few minutes: everything but the tests marked slow (real models, compare runs, subprocesses), the ones that start
# a service, and the browser test. `make test` and CI still run those.
test-fast: venv
	$(PYTEST) -m "not slow and not service and not browser"

clean:
	rm -rf $(VENV) $(DEMO) runs
