# cprctl: the README's two commands, `make demo` and `make test`, work on a fresh Debian 12 machine as root.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
GUEST_DIR ?= $(HOME)/.cache/cprctl-guest
OLD_QEMU_DIR ?= $(HOME)/.cache/cprctl-old-qemu
QEMU_ROOTS ?= $(HOME)/.cache/cprctl-qemu-roots
export CPRCTL_QEMU_ROOTS := $(QEMU_ROOTS)
export CPRCTL_TEST_GUEST := $(GUEST_DIR)
export CPRCTL_OLD_QEMU := $(OLD_QEMU_DIR)/usr/bin/qemu-system-x86_64

.PHONY: all deps venv guest old-qemu qemu-roots demo test test-quick test-hostvm test-devices hostvm-image unit lint bench bench-reboot clean

all: test

# QEMU >= 9.0 (bookworm-backports) and the packages the test guest is built from.
deps:
	@if [ "$$(id -u)" -eq 0 ]; then bash scripts/install-deps.sh; else sudo bash scripts/install-deps.sh; fi

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

guest: deps
	@if [ "$$(id -u)" -eq 0 ]; then bash guest/build.sh $(GUEST_DIR); else sudo bash guest/build.sh $(GUEST_DIR); fi

# Debian 12's own QEMU 7.2, unpacked (not installed): the tests check that cprctl refuses it.
old-qemu: deps
	@if [ "$$(id -u)" -eq 0 ]; then bash scripts/old-qemu.sh $(OLD_QEMU_DIR); else sudo bash scripts/old-qemu.sh $(OLD_QEMU_DIR); fi

# Debian 13's QEMU (10.0.x) and Debian unstable's (11.x) in cached Debian roots, each with a wrapper that runs it
# here (tests/test_versions.py); built in parallel.
qemu-roots: deps
	@run() { if [ "$$(id -u)" -eq 0 ]; then bash scripts/qemu-root.sh $$1 $(QEMU_ROOTS); else sudo bash scripts/qemu-root.sh $$1 $(QEMU_ROOTS); fi; }; \
	run trixie & a=$$!; run unstable & b=$$!; wait $$a && wait $$b

demo: deps venv guest
	$(VENV)/bin/cprctl demo --guest $(GUEST_DIR)

lint: venv
	$(VENV)/bin/ruff check src tests $(wildcard benchmarks ansible)
	$(VENV)/bin/mypy

unit: venv
	$(VENV)/bin/pytest -q -m "not qemu"

# The test suite without the host VM modules, and those modules (-s: their set-up phases and costs).
SUITE = $(VENV)/bin/pytest -q -ra -m "not hostvm and not devices"
HOSTVM_TESTS = $(VENV)/bin/pytest -q -ra -s --durations=0 -m "hostvm or devices"

# Lint, then the test suite and the host VM modules (tests/test_hostvm.py, then tests/test_hostvm_devices.py, each
# with a host VM of its own) side by side: what .ci/run runs (README, *Development*). A host VM has one vCPU, so the
# modules take one core and the suite the other; their lines come prefixed `[hostvm]` as they come, their whole log
# is build/hostvm-tests.log. Not as root, the host VM tests skip themselves and the modules are not started.
test: deps venv guest old-qemu qemu-roots lint
	@mkdir -p build; hv=; \
	if [ "$$(id -u)" -eq 0 ]; then \
		( set -o pipefail; $(HOSTVM_TESTS) --basetemp=build/hostvm-tmp 2>&1 | tee build/hostvm-tests.log \
			| sed -u 's/^/[hostvm] /' ) & hv=$$!; \
	fi; \
	$(SUITE); rc=$$?; \
	hrc=0; if [ -n "$$hv" ]; then wait $$hv || hrc=$$?; fi; \
	echo "make test: suite exit $$rc; host VM module $$([ -n "$$hv" ] && echo "exit $$hrc" || echo "not run (not root)")"; \
	[ $$rc -eq 0 ] && [ $$hrc -eq 0 ]

# Lint and the test suite without the host VM module.
test-quick: deps venv guest old-qemu qemu-roots lint
	$(SUITE)

# The host VM modules alone (root only): real host reboots (systemctl reboot, cprctl reboot --kexec, crashes) in a
# Debian 13 host VM, its image cached under ~/.cache/cprctl-hostvm, then persistent memory and VFIO in another; -s
# shows their set-up phases and costs.
test-hostvm: deps venv guest
	$(HOSTVM_TESTS)

# Persistent memory (an NVDIMM, ext4 -o dax) and a real VFIO device (QEMU's edu behind an emulated IOMMU) in the
# host VM (tests/test_hostvm_devices.py, root only) alone.
test-devices: deps venv guest
	$(VENV)/bin/pytest -q -ra -s --durations=0 -m devices

# The host VM's image alone (the tests build it on first use too).
hostvm-image: deps venv
	$(VENV)/bin/python -c 'from tests.hostvm import cached_image; print(cached_image().folder)'

bench: deps venv guest
	$(VENV)/bin/python benchmarks/bench.py --guest $(GUEST_DIR)

# Each guest's downtime across real host reboots and kexecs in the host VM (issue 16; benchmarks/README.md): the
# host VM's image, and for its UEFI cold boot (reboot.py's default --host-boot uefi) OVMF, GRUB and mtools.
BENCH_REBOOT_ARGS ?= --rounds 3 --firmware-only
bench-reboot: deps venv guest
	@if [ "$$(id -u)" -eq 0 ]; then bash scripts/install-uefi-deps.sh; else sudo bash scripts/install-uefi-deps.sh; fi
	$(VENV)/bin/python benchmarks/reboot.py $(BENCH_REBOOT_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
