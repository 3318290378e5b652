//! The real runtime (feature `real`): tokio, an HTTP server, a file log.
//! TODO(issue 6).
