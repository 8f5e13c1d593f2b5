# feedrank — the two set-up commands are `make demo` and `make test`.
# Both create/refresh .venv idempotently and install the project into it.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3 2>/dev/null)
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.feedrank-installed
PYTEST_ARGS ?=

JVM_DIR := var/jvm
JVM_STAMP := $(JVM_DIR)/.fetched

.PHONY: test demo venv jvm sysdeps preflight clean help

help:
	@echo "make test   - create .venv, install feedrank, run the test suite"
	@echo "make demo   - create .venv, install feedrank, run the end-to-end demo"
	@echo "make jvm    - fetch the JVM artifacts (Kafka, Flink connectors) into var/jvm (part of both)"

preflight:
	@if [ -z "$(PYTHON)" ]; then echo "feedrank needs Python 3.11: apt-get install -y python3.11 python3.11-venv (or pyenv install 3.11)"; exit 1; fi
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' || { \
	  echo "feedrank needs Python 3.11 (found $$($(PYTHON) --version 2>&1)): install it, or run 'make PYTHON=/path/to/python3.11 ...'"; exit 1; }
	@command -v java >/dev/null 2>&1 || { echo "Flink needs Java 17: apt-get install -y openjdk-17-jre-headless"; exit 1; }
	@v=$$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1); \
	  if [ "$$v" != "17" ]; then echo "Flink needs Java 17 (found Java $$v): apt-get install -y openjdk-17-jre-headless, and put it first on PATH / JAVA_HOME"; exit 1; fi
	@command -v mvn >/dev/null 2>&1 || { echo "feedrank fetches its JVM artifacts (Kafka, Flink connectors) with Maven: apt-get install -y maven"; exit 1; }

$(VPY):
	$(PYTHON) -m venv $(VENV)

# Re-install only when the dependency list changes.
$(STAMP): pyproject.toml | $(VPY)
	$(VPY) -m pip install --upgrade pip setuptools wheel
	$(VPY) -m pip install -e '.[dev]'
	@touch $(STAMP)

venv: preflight $(STAMP)

# JVM artifacts (core/jvm/pom.xml: the Kafka broker and tools, Flink's Kafka connector and Parquet
# format) from Maven Central via ~/.m2 into var/jvm; again only when the pom changes. The stamp holds
# the pom's digest, as core/jvm.py checks it.
$(JVM_STAMP): core/jvm/pom.xml
	@echo "fetching JVM artifacts (core/jvm/pom.xml) into $(JVM_DIR)"
	rm -rf $(JVM_DIR)/kafka $(JVM_DIR)/flink $(JVM_DIR)/crds
	mvn -B -q -Dstyle.color=never -f core/jvm/pom.xml package -Djvm.out=$(CURDIR)/$(JVM_DIR)
	@sha256sum core/jvm/pom.xml | cut -d' ' -f1 > $(JVM_STAMP)

jvm: preflight $(JVM_STAMP)

# Debian packages the tests run for real: nginx, the gRPC load balancer of `feedrank serve --replicas`
# (serving/replicas_test.py), prometheus (promtool and a real Prometheus: serving/monitoring_test.py), and
# chromium with its driver (Selenium drives the /debug page headless: serving/served_test.py).
# Installed when missing and we may (root with apt-get), else the one-line fix.
SYSDEPS = nginx:/usr/sbin/nginx prometheus:/usr/bin/promtool chromium:/usr/bin/chromium chromium-driver:/usr/bin/chromedriver
sysdeps:
	@missing=""; for d in $(SYSDEPS); do [ -x "$${d#*:}" ] || missing="$$missing $${d%%:*}"; done; \
	[ -z "$$missing" ] || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's$$missing (the replica, monitoring and debug-page tests run them)"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -qq --no-install-recommends $$missing >/dev/null 2>&1 || \
	      { apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing; } || exit 1; \
	  else echo "the replica, monitoring and debug-page tests need:$$missing: sudo apt-get install -y$$missing"; exit 1; fi; }

# The in-process PyFlink job tests (jobs/) each run in their own pytest process: all local jobs of
# one Python process share its gateway JVM, and once an embedded interpreter got stuck opening
# operators (seen intermittently) every later job in that JVM stayed INITIALIZING.
test: venv jvm sysdeps
	@set +e; \
	if [ -n "$(PYTEST_ARGS)" ]; then runs=("$(PYTEST_ARGS)"); else runs=("--ignore-glob=jobs/*" $$(ls jobs/*_test.py)); fi; \
	rc=0; for r in "$${runs[@]}"; do \
	  $(VPY) -m pytest $$r; c=$$?; \
	  if [ $$c -eq 5 ]; then echo "ERROR: pytest collected no tests ($$r)"; c=1; fi; \
	  if [ $$c -ne 0 ]; then echo "FAILED: pytest $$r (exit $$c)"; rc=$$c; fi; \
	done; exit $$rc

demo: venv jvm
	$(VENV)/bin/feedrank demo

clean:
	rm -rf var reports .pytest_cache
