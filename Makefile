# storyreel — the two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU wheel for dev and CI. On a GPU box: make install TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
DEMO   := demo

.PHONY: install system-packages demo test test-fast lint typecheck unit bench device-wheels device-rehearsal clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e '.[dev,ray,voice]'
	touch $@

# Debian packages the tests use, installed only where missing (needs root and apt-get; CI runs
# as root on a clean machine): fonts for the contact sheet (Latin and symbols; CJK), chromium for
# the status page's browser tests, and the share servers and FUSE clients of tests/test_shares.py
# (a real smbd through rclone mount, a real sshd through sshfs, all on 127.0.0.1); iproute2 and
# libseccomp2 for the loopback-only network namespaces of the Ray tests; espeak-ng, the voice that
# is always there (pipeline/sound/espeak.py), for narration and its tests. No recommends:
# they would pull in services (samba's AD tools) the tests never start. Without them those tests
# skip, except under CI.
SYSTEM_PACKAGES := fonts-dejavu-core fonts-noto-cjk chromium samba smbclient rclone openssh-server sshfs fuse3 iproute2 libseccomp2 espeak-ng
system-packages:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# The whole job on the tiny random-weight model: examples/stories -> demo/outbox/*.zip
demo: install
	rm -rf $(DEMO)/inbox $(DEMO)/outbox
	mkdir -p $(DEMO)/inbox
	for f in examples/stories/*.json; do cp "$$f" $(DEMO)/inbox/; done
	$(BIN)/python examples/make_bundle.py $(DEMO)/inbox/04-own-pictures.zip
	$(BIN)/storyreel run --once --config examples/demo.toml
	@echo
	@echo "Demo finished. ZIPs (one per story):"
	@ls -1 $(CURDIR)/$(DEMO)/outbox/*.zip
	@echo "Status sidecars: $(CURDIR)/$(DEMO)/outbox/*.status.jsonl"

lint: install
	$(BIN)/ruff check pipeline daemon tests bench
	$(BIN)/ruff format --check pipeline daemon tests bench

typecheck: install
	$(BIN)/mypy

# Four workers, also on 2 cores: a daemon start is a fork from a warm server (tests/forked.py),
# and many tests wait on daemons, share servers and browsers, so four overlap better than two
# (quiet, 2 cores: 342 s with -n 4, 403 s with -n auto = 2, 386 s with -n 6). Every test waits
# on events, so running side by side is safe. Tests go out longest first, by the last run's
# durations (tests/conftest.py, _longest_first); loadgroup keeps a module's shared fixture on
# one worker.
unit: install
	$(BIN)/python -m pytest -q -n 4 --dist loadgroup --no-loadscope-reorder --durations=15

test: lint typecheck unit

# The edit-test loop: lint and every test but the slow ones (the tiny model, full daemon runs).
test-fast: lint
	$(BIN)/python -m pytest -q -m "not slow"

bench: install
	$(BIN)/python bench/kenburns.py
	$(BIN)/python bench/scene_breakdown.py
	$(BIN)/python bench/overlap.py

# The wheels the GPU machine lacks (cp312 manylinux, pinned to .venv) for bench/device_check.sh;
# the folder is git-ignored and travels with the device tool's carry=["wheels"]. Prints the size.
device-wheels: install
	$(BIN)/python bench/device_wheels.py download --dest wheels

# The GPU visit's dress rehearsal, on this CPU machine (8 minutes; the first time 12): a fresh clone
# of HEAD, `make device-wheels` there, then bench/device_check.sh in its reduced mode under a
# Python 3.12 venv holding the device's torch, transformers, accelerate, huggingface_hub and numpy
# (build/device-rehearsal/py312, 5 GB, made once). Passes only if every part reports ok and
# storyreel came from its wheel. Not in `make test` (bench/README.md, "Rehearse").
device-rehearsal: install
	$(BIN)/python bench/device_rehearsal.py

clean:
	rm -rf $(DEMO) .pytest_cache .mypy_cache .ruff_cache
