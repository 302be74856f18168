//! The consul backend of waypost (in progress).
