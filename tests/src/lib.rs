//! The conformance matrix of waypost: `cargo test -p waypost-tests` runs every
//! conformance suite of `waypost-testkit` against every backend — the memory backend
//! always, and ZooKeeper, etcd and Consul on real servers the testkit starts (under `CI`
//! a missing server fails the run; outside CI it is reported as skipped on stderr).
//!
//! One file per backend under `tests/`: each implements the testkit's `TestBackend` and
//! `Faults` for its registry (how to expire sessions, cut the registry off, and write as a
//! foreign client with the registry's own tools) and expands `conformance_tests!`.
//! Backend crates keep only their registry-specific tests (formats, auth, native tools).
