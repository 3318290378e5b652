//! Skewed node clocks. madsim has one virtual time for all nodes; a real fleet
//! does not. Each node reads `base + offset + elapsed * (1 + drift)`, so expiry
//! times and deadlines computed by one node and judged by another disagree by a
//! bounded amount, as in production.

/// Every node's clock starts here (so a negative offset never underflows).
pub const CLOCK_BASE_NS: u64 = 1_000_000_000_000; // 1000 s

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Skew {
    pub offset_ms: i32,
    pub drift_ppm: i32,
}

impl Skew {
    /// The node's reading at virtual time `elapsed_ns`.
    pub fn read(self, elapsed_ns: u64) -> u64 {
        // i64 arithmetic when it cannot overflow (runs shorter than ~2.5
        // simulated hours): the same integers as i128, without 128-bit division.
        if elapsed_ns < 1 << 62
            && let Ok(e) = i64::try_from(elapsed_ns)
            && let Some(skewed) = e.checked_mul(i64::from(self.drift_ppm))
        {
            let t = CLOCK_BASE_NS as i64 + i64::from(self.offset_ms) * 1_000_000 + e + skewed / 1_000_000;
            return u64::try_from(t.max(0)).unwrap_or(0);
        }
        let drifted = i128::from(elapsed_ns) + i128::from(elapsed_ns) * i128::from(self.drift_ppm) / 1_000_000;
        let t = i128::from(CLOCK_BASE_NS) + i128::from(self.offset_ms) * 1_000_000 + drifted;
        u64::try_from(t.max(0)).unwrap_or(0)
    }

    /// The virtual time at which the node's clock first reads at least `node_ns`
    /// (rounded up so a wake-up never lands just short of its deadline).
    pub fn virtual_at(self, node_ns: u64) -> u64 {
        let local = i128::from(node_ns) - i128::from(CLOCK_BASE_NS) - i128::from(self.offset_ms) * 1_000_000;
        if self.drift_ppm == 0 && local >= 0 {
            // No drift: the clock is a shift, its inverse exact (what the search below finds).
            return u64::try_from(local).unwrap_or(u64::MAX);
        }
        let scale = 1_000_000 + i128::from(self.drift_ppm);
        // The integer inverse is within a few ns; start just below and step up
        // to the first virtual time whose reading reaches `node_ns`.
        let v = local * 1_000_000 / scale - 4;
        let mut v = u64::try_from(v.max(0)).unwrap_or(0);
        while self.read(v) < node_ns {
            v += 1;
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_agrees_with_128_bit_arithmetic() {
        for (offset_ms, drift_ppm) in [(0, 0), (-1000, -1000), (999, 1000), (-3, 7), (12, -999)] {
            let skew = Skew { offset_ms, drift_ppm };
            for e in [
                0u64,
                1,
                999_999,
                1_000_001,
                4_150_000_123,
                123_456_789_012_345,
                (1 << 62) - 1,
                1 << 62,
                u64::MAX,
            ] {
                let drifted = i128::from(e) + i128::from(e) * i128::from(drift_ppm) / 1_000_000;
                let t = i128::from(CLOCK_BASE_NS) + i128::from(offset_ms) * 1_000_000 + drifted;
                let want = u64::try_from(t.max(0)).unwrap_or(0);
                assert_eq!(skew.read(e), want, "{skew:?} at {e}");
            }
        }
    }

    #[test]
    fn virtual_at_inverts_read() {
        for skew in [
            Skew::default(),
            Skew {
                offset_ms: -700,
                drift_ppm: 900,
            },
            Skew {
                offset_ms: 300,
                drift_ppm: -800,
            },
        ] {
            for v in [0u64, 1, 999, 5_000_000, 12_345_678_901] {
                let node = skew.read(v);
                let back = skew.virtual_at(node);
                assert!(back <= v && skew.read(back) >= node, "{skew:?} v={v} back={back}");
            }
        }
    }
}
