//! The canonical trace: one readable line per event, hashed so two runs can be
//! compared by one number. Lines are only formatted when a trace is wanted
//! (replay, tests); sweeps keep the hash of nothing and run faster.

use std::fmt::Write as _;

#[derive(Debug, Default)]
pub struct Trace {
    enabled: bool,
    lines: Vec<String>,
}

impl Trace {
    pub fn new(enabled: bool) -> Trace {
        Trace {
            enabled,
            lines: Vec::new(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Records `t=<ms> <node> <text>`. `text` is built lazily so sweeps pay nothing.
    pub fn line(&mut self, t_ns: u64, node: &str, text: impl FnOnce() -> String) {
        if self.enabled {
            let mut s = String::with_capacity(64);
            // Microsecond precision: madsim's latencies are nanosecond-exact, but
            // people read milliseconds.
            let _ = write!(
                s,
                "t={}.{:03}ms {node} {}",
                t_ns / 1_000_000,
                (t_ns / 1_000) % 1_000,
                text()
            );
            self.lines.push(s);
        }
    }

    pub fn lines(&self) -> &[String] {
        &self.lines
    }

    pub fn into_lines(self) -> Vec<String> {
        self.lines
    }
}

/// FNV-1a 64 over the lines (with newlines): stable across platforms and builds.
pub fn trace_hash(lines: &[String]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for line in lines {
        for b in line.bytes().chain(std::iter::once(b'\n')) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01B3);
        }
    }
    h
}

/// The full canonical text: every line, then `trace-hash: <hex>`.
pub fn render(lines: &[String]) -> String {
    let mut out = String::new();
    for l in lines {
        out.push_str(l);
        out.push('\n');
    }
    let _ = writeln!(out, "trace-hash: {:016x}", trace_hash(lines));
    out
}
