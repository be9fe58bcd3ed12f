# One task runner that mirrors CI (.ci/run).
PY ?= python

.PHONY: protos check-protos fmt lint typecheck test bench up demo

protos:
	$(PY) scripts/gen_protos.py

check-protos: protos
	@git diff --exit-code --stat -- common/api || (echo "generated code is stale: run 'make protos' and commit" && exit 1)
	@test -z "$$(git status --porcelain -- common/api)" || (echo "untracked generated files: run 'make protos' and commit" && git status --porcelain -- common/api && exit 1)

fmt:
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

lint:
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

typecheck:
	$(PY) -m mypy common services tests benchmarks

test:
	$(PY) -m pytest -q

bench:
	$(PY) benchmarks/serve_bench.py
	$(PY) benchmarks/queue_bench.py
	$(PY) benchmarks/train_bench.py
	$(PY) benchmarks/compress_bench.py

up:
	$(PY) -m services.cli.main up

demo:
	$(PY) -m services.cli.main demo
