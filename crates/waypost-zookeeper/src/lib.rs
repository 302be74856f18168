//! The zookeeper backend of waypost (in progress).
