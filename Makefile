PY ?= python3
PROTO_DIR := protos
PROTOS := $(wildcard $(PROTO_DIR)/splitserve/v1/*.proto)

.PHONY: install protos protos-check test lint up bench

install:
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[dev]'

protos:
	$(PY) -m grpc_tools.protoc -I $(PROTO_DIR) --python_out=$(PROTO_DIR) \
		--grpc_python_out=$(PROTO_DIR) --pyi_out=$(PROTO_DIR) $(PROTOS)

# Regenerates into a scratch folder and fails if the committed code differs.
protos-check:
	@tmp=$$(mktemp -d); \
	$(PY) -m grpc_tools.protoc -I $(PROTO_DIR) --python_out=$$tmp --grpc_python_out=$$tmp \
		--pyi_out=$$tmp $(PROTOS) && \
	diff -r -x '__init__.py' -x '__pycache__' $$tmp/splitserve/v1 $(PROTO_DIR)/splitserve/v1 \
		| grep -v '^Only in $(PROTO_DIR)/splitserve/v1: .*\.proto$$' | grep . \
		&& { echo "generated protobuf code is stale: run 'make protos'"; exit 1; } || echo "protos up to date"

test:
	$(PY) -m pytest -q

lint:
	$(PY) -m ruff check .

up:
	splitserve up

bench:
	splitserve bench offline
