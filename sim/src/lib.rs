//! sagamq-sim: the deterministic simulation testbed. TODO(issue 4).
#![forbid(unsafe_code)]
