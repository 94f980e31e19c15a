# nightcopy — the entry points a newcomer needs (README.md):
#   make demo   back up a generated sample tree into a local S3-compatible server, end to end
#   make test   every test, against real local servers (installed on first use)
#   make deb    the Debian package, target/debian/nightcopy_VERSION-1_amd64.deb (docs/packaging.md)
.PHONY: build test demo lint fmt tools clean bench bench-quick deb

# Paths of the local servers, installed into ~/.cache on first use (scripts/test-tools.sh).
TOOLS_ENV = eval "$$(scripts/test-tools.sh | sed 's/^/export /')"
# The demo needs only s3s-fs and moto, not the tests' Garage, rclone or FUSE mount.
DEMO_ENV = eval "$$(scripts/test-tools.sh --demo | sed 's/^/export /')"

build:
	cargo build --locked

test:
	@$(TOOLS_ENV); cargo test --locked --all-targets

# The systemd units, the Ansible role and the AWS documents, and the whole install under a real
# systemd (docs/packaging.md). Needs root; installs its tools into ~/.cache on first use.
.PHONY: test-packaging
test-packaging:
	packaging/tests/run.sh

# cargo-deb (pinned, into ~/.cache on first use) packs the release binary, the units, the man
# page and the docs ([package.metadata.deb] in Cargo.toml, packaging/deb/).
deb:
	packaging/deb/build.sh

demo: build
	@$(DEMO_ENV); scripts/demo.sh

# Side by side with rclone, s5cmd and aws s3 sync on a local Garage (scripts/bench.py); writes
# docs/benchmarks.md. About 45 min before the restore scenario was added (not timed since);
# bench-quick (trees / 10) a few minutes. BENCH_ARGS passes flags.
BENCH_ENV = eval "$$(scripts/test-tools.sh --bench | sed 's/^/export /')"

bench:
	cargo build --release --locked
	@$(BENCH_ENV); "$$NIGHTCOPY_PYTHON" scripts/bench.py $(BENCH_ARGS)

bench-quick:
	@$(MAKE) --no-print-directory bench BENCH_ARGS="--quick $(BENCH_ARGS)"

lint:
	cargo fmt --all -- --check
	cargo clippy --locked --all-targets -- -D warnings

fmt:
	cargo fmt --all

tools:
	scripts/test-tools.sh

clean:
	cargo clean
