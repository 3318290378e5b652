//! Planted bugs: realistic participant (and broker-wiring) mistakes, selectable
//! with `--bug NAME`. They live here, never in the shipped participants, and the
//! test suite proves the simulator catches each one.

use std::fmt;
use std::str::FromStr;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Bug {}

impl Bug {
    pub const ALL: [Bug; 0] = [];

    pub fn name(self) -> &'static str {
        match self {}
    }

    pub fn explain(self) -> &'static str {
        match self {}
    }
}

impl fmt::Display for Bug {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Bug {
    type Err = String;
    fn from_str(s: &str) -> Result<Bug, String> {
        Bug::ALL
            .into_iter()
            .find(|b| b.name() == s)
            .ok_or_else(|| format!("unknown bug {s:?}; `sagamq-sim list-bugs` names them"))
    }
}

/// The participant a planted bug puts on `node`, or None when the bug leaves that node alone.
pub fn build(
    bug: Bug,
    node: usize,
    def: &sagamq::saga::scenario::Scenario,
    config: sagamq::saga::HostConfig,
    image: &[u8],
) -> Option<crate::participants::Built> {
    let _ = (node, def, config, image);
    match bug {}
}
