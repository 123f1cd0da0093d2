# Keyward — see README.md. `make` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help
.PHONY: help build images deps test bench lint fmt demo clean proto

GO           ?= go
BIN          := bin
TEST_TIMEOUT ?= 45m
# staticcheck through the Go module proxy (checked against go1.26 in the package list).
STATICCHECK  ?= honnef.co/go/tools/cmd/staticcheck@v0.8.2
VERSION      ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS      := -X github.com/keyward/keyward/internal/version.Version=$(VERSION)
IMAGE_TAG    ?= dev
# keyward-kms's image carries the shared libraries of these PKCS#11 modules (not the modules: they
# are mounted from the host), so that it can load them. Default: SoftHSM's, where it is installed.
KMS_MODULE_DEPS ?= $(wildcard /usr/lib/softhsm/libsofthsm2.so)

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  make %-6s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

build: ## Build keyward-kms, keyward-broker, keyward-env and keywardctl into bin/
	$(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN)/ ./cmd/...

images: ## Build the OCI images (keyward-broker, keyward-kms, keyward-env, pause, secretcheck) into bin/images/, reproducibly
	$(GO) run ./test/tools/mkimage -out $(BIN)/images -tag $(IMAGE_TAG) -version $(VERSION) -module-deps '$(KMS_MODULE_DEPS)'

deps: ## Install SoftHSM2, PostgreSQL and the node runtime (containerd, runc, CNI); build etcd, Kubernetes and Vault (cached)
	test/tools/deps.sh

test: deps lint ## Lint, then unit, integration and e2e tests with -race against the real components
	$(GO) test -race -count=1 -timeout $(TEST_TIMEOUT) ./...

bench: deps ## Benchmarks, with ratios against a baseline measured in the same run
	test/tools/bench.sh

lint: ## go vet, gofmt check and staticcheck
	$(GO) vet ./...
	@files=$$(gofmt -l $$(find . -name '*.go' -not -path './bin/*')); \
	  if [ -n "$$files" ]; then echo "gofmt needed (run make fmt):"; echo "$$files"; exit 1; fi
	$(GO) run $(STATICCHECK) ./...

fmt: ## Format the Go code
	gofmt -w $$(find . -name '*.go' -not -path './bin/*')

demo: deps ## The whole flow on loopback: HSM, KMS plugin, etcd, apiserver, Vault, CSI driver (as root)
	$(GO) run ./test/demo

proto: ## Regenerate proto/**/*.pb.go from the .proto files (Debian protoc; protoc-gen-go, protoc-gen-go-grpc pinned in test/harness/versions.env)
	test/tools/protogen.sh

clean: ## Remove bin/ (the component cache in ~/.cache/keyward stays)
	rm -rf $(BIN)
