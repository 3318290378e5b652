//! CPU time of this process (`getrusage(RUSAGE_SELF)`: every thread, user
//! and system), for `/stats` and `sagamq bench`'s µs of CPU per message.

use std::time::Duration;

/// User and system CPU time this process has used so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuTime {
    pub user: Duration,
    pub system: Duration,
}

impl CpuTime {
    pub fn total(&self) -> Duration {
        self.user + self.system
    }
}

fn duration_of(tv: nix::sys::time::TimeVal) -> Duration {
    let secs = u64::try_from(tv.tv_sec()).unwrap_or(0);
    let micros = u64::try_from(tv.tv_usec()).unwrap_or(0);
    Duration::from_secs(secs) + Duration::from_micros(micros)
}

/// `getrusage(RUSAGE_SELF)`; `None` if the call fails (it does not on Linux).
pub fn process_cpu() -> Option<CpuTime> {
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF).ok()?;
    Some(CpuTime {
        user: duration_of(usage.user_time()),
        system: duration_of(usage.system_time()),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn cpu_time_grows_with_work() {
        let a = super::process_cpu().expect("getrusage");
        let mut x = 0u64;
        let t0 = std::time::Instant::now();
        while t0.elapsed() < std::time::Duration::from_millis(30) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(1));
        }
        let b = super::process_cpu().expect("getrusage");
        assert!(b.total() > a.total(), "{a:?} -> {b:?}");
    }
}
