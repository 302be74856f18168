#!/usr/bin/env bash
# The project's test command (README): installs the real registries if missing, then
# checks formatting and lints, runs every test against the real servers, and runs the
# quickstart. Under CI (CI set) a missing server fails the run; it is never skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-servers.sh

# A CI build is built once: incremental caches would only cost disk (2.5 GB of 12).
if [ -n "${CI:-}" ]; then export CARGO_INCREMENTAL=0; fi
# A full build and test run takes ~3 GB of disk (target/ and the servers' temp dirs).
echo "== disk free here: $(df -Ph . | awk 'NR==2 {print $4}')"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --all-features -- -D warnings
echo "== cargo test"
cargo test --workspace --all-features
echo "== cargo test: facade without backends (scheme errors name the feature)"
cargo test -p waypost --no-default-features --lib
echo "== quickstart"
cargo run --quiet --example quickstart
echo "== config_manager"
cargo run --quiet --example config_manager
echo "== lock"
cargo run --quiet --example lock
echo "== leader"
cargo run --quiet --example leader
