# The README's two commands: `make run` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch: on machines without a GPU this keeps pip from pulling a CUDA wheel
# of several GB. Override with TORCH_SPEC= (empty) to keep a torch you installed yourself.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: run test bench clean browser postgres

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if [ -n "$(TORCH_SPEC)" ] && ! $(PY) -c "import torch" 2>/dev/null; then \
		$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"; fi
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,export-check]'
	@touch $@

run: $(STAMP)
	$(VENV)/bin/autotune run

# tests/cli/test_report.py opens report.html in headless Chromium: Debian's packages, installed
# when missing where apt-get runs as root (the apt lists refreshed only when an install needs
# it); elsewhere that test skips and says why. Instant once installed.
browser:
	@if { [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; } && \
	    command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		echo "installing chromium and chromium-driver for the report test (apt-get)"; \
		get() { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends chromium chromium-driver >/dev/null; }; \
		get 2>/dev/null || { apt-get update -qq && get; }; fi

# tests/scaleout start a throwaway PostgreSQL server on loopback (initdb into a temporary
# folder) for the workers' shared study: Debian's postgresql, installed like chromium above;
# elsewhere those tests skip and say why. The server binaries live in
# /usr/lib/postgresql/<version>/bin, which the tests find without PATH.
postgres:
	@if ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 && ! command -v pg_ctl >/dev/null && \
	    command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		echo "installing postgresql for the scale-out tests (apt-get)"; \
		get() { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends postgresql >/dev/null; }; \
		get 2>/dev/null || { apt-get update -qq && get; }; fi

# pytest exits 5 when it collects nothing: a broken test tree, never a pass.
test: $(STAMP) browser postgres
	@AUTOTUNE_REQUIRE_EXPORT_CHECK=1 $(PY) -m pytest -q $(PYTEST_ARGS); status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; \
	exit $$status

bench: $(STAMP)
	$(PY) -m suites.scheduling

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
