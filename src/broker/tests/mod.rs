//! Broker tests.
