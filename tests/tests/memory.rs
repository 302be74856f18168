//! The memory backend in the matrix: the same file `cargo test -p waypost-core` runs, so
//! the suites are tested without any server and the matrix stays complete.
include!("../../crates/waypost-core/tests/common/memory_backend.rs");
