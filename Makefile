# The two commands of the README. Each first runs the idempotent set-up
# (Debian packages, kernel-header links, bpffs, .venv with the project installed).
# make bench KATRAN=DIR: bench_xdp also measures Katran's balancer (a Katran checkout or git dir) and the per-packet budget (part k).
.PHONY: setup demo test bench clean

PY := .venv/bin/python

setup:
	@scripts/setup.sh

demo: setup
	@.venv/bin/lbctl lab demo

test: setup
	@$(PY) -m pytest -q

bench: setup
	@$(PY) -m bench.bench_maglev
	@$(PY) -m bench.bench_datapath
	@$(PY) -m bench.bench_pktgen
	@$(PY) -m bench.bench_xdp $(if $(KATRAN),--katran $(KATRAN))
	@$(PY) -m bench.bench_features
	@$(PY) -m bench.bench_userspace_io
	@$(PY) -m bench.bench_control

clean:
	rm -rf .venv bench/results .pytest_cache
