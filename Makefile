# sockrelay: common tasks. `make run` starts the relay in front of the bundled echo upstream; `make test`
# runs the whole suite (the command CI runs).

STATICCHECK := honnef.co/go/tools/cmd/staticcheck@v0.8.2
VERSION     ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
COMMIT      ?= $(shell git rev-parse HEAD 2>/dev/null)
LDFLAGS     := -X main.version=$(VERSION) -X main.commit=$(COMMIT)

.PHONY: build release run test test-vm lint check-deploy generate check-generate bench bench-update clean

build:
	mkdir -p bin
	go build -ldflags '$(LDFLAGS)' -o bin/sockrelay ./cmd/sockrelay
	go build -o bin/wsecho ./cmd/wsecho
	go build -o bin/wsbench ./cmd/wsbench

# Static binaries for linux/amd64 and linux/arm64 (ARCHES=amd64 for one), a .deb for each and SHA256SUMS,
# under dist/; the version comes from git describe --tags.
release:
	scripts/release.sh

run:
	scripts/run-demo.sh

test:
	scripts/test.sh

# The privileged tests on Debian's 6.1 and 6.12 kernels under qemu (docs/kernels.md); CI runs it too.
test-vm:
	scripts/vmtest.sh 6.1 6.12

# sockrelay against nginx and HAProxy on this machine. bench writes its report into a new temporary folder
# and prints where, leaving the work tree clean; bench-update rewrites docs/bench/ (scripts/bench.sh full
# for the long run).
bench:
	scripts/bench.sh quick

bench-update:
	scripts/bench.sh quick docs/bench

lint:
	@unformatted=$$(gofmt -l $$(git ls-files '*.go')); \
	if [ -n "$$unformatted" ]; then echo "gofmt would change: $$unformatted"; exit 1; fi
	go vet ./...
	go run $(STATICCHECK) ./...

# Decodes deploy/kubernetes/ strictly into the Kubernetes API types and checks the DaemonSet's security
# (host network, not privileged, non-root, the unit's four capabilities), offline; a module of its own,
# so that the relay's go.mod does not carry the Kubernetes API. CI runs it.
check-deploy:
	cd deploy/kubernetes && go vet ./... && go test -count=1 ./...

# Regenerates the Go bindings of the BPF programs (needs Debian's clang, llvm and libbpf-dev).
generate:
	go generate ./bpf/

# Fails when the committed bindings differ from what the C sources generate (CI runs it).
check-generate: generate
	@git diff --exit-code --stat -- bpf/ || { echo "bpf/: generated files are stale; run make generate and commit them"; exit 1; }

clean:
	rm -rf bin dist
