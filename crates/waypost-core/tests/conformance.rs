//! The whole conformance suite on the memory backend, so the suite itself is always
//! tested without any server.
include!("common/memory_backend.rs");
