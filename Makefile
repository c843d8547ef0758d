# Two commands set everything up on a fresh Debian machine and are fast the second time:
#   make demo   trains the embedded demo end to end on CPU (runs/demo/)
#   make test   runs the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastdino-installed
SYSTEM_PACKAGES := pkg-config libturbojpeg0-dev libopencv-dev

.PHONY: demo test setup system-packages clean

demo: $(STAMP)
	$(VENV)/bin/fastdino demo

test: $(STAMP)
	$(PY) -m pytest -q tests

setup: $(STAMP)

# FFCV compiles against libjpeg-turbo and OpenCV, found through pkg-config.
system-packages:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q "ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing system packages:" $$missing; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null || exit 1; \
	  else \
	    echo "missing system packages; run: sudo apt-get install -y $$missing"; exit 1; \
	  fi; \
	fi

# torch first, pinned to the CPU build this machine provides, so no dependency pulls a CUDA one.
$(STAMP): setup.py | system-packages
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
	set -o pipefail; $(PY) -m pip install -q torch==2.13.0 2>&1 | { grep -v "is ignored" || true; }
	set -o pipefail; $(PY) -m pip install -q -e '.[dev,ffcv,deepspeed]' 2>&1 | { grep -v "is ignored" || true; }
	touch $(STAMP)

clean:
	rm -rf $(VENV) runs *.egg-info
