//! The etcd backend of waypost (in progress).
