//! Broker tests: a small driver ([`harness`]), behaviour scenarios, and a
//! property test checking random histories (with crashes) against a model.

mod harness;
mod model;
mod scenarios;
