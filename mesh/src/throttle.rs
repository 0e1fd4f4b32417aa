//! Log volume bounded per warning: a warning that can fire once per request or per frame (a
//! spent retry budget, a hostile peer's bad frames) is written at most once per period, and the
//! line that is written says how many were suppressed since the last one. Keys are the warning
//! sites, fixed in the code, never a value a peer or client chooses, so the table cannot grow.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often each warning may be written.
pub const PERIOD: Duration = Duration::from_secs(1);

/// Per warning site: when it was last written, and how many were suppressed since.
#[derive(Debug, Default)]
pub struct Throttle {
    sites: Mutex<HashMap<&'static str, (Instant, u64)>>,
}

impl Throttle {
    /// Whether the warning `site` may be written at `now`: `Some(suppressed)` with the number
    /// dropped since the last one written, or `None` to drop this one.
    pub fn admit(&self, site: &'static str, now: Instant) -> Option<u64> {
        let mut sites = self.sites.lock().unwrap_or_else(|p| p.into_inner());
        match sites.get_mut(site) {
            Some((last, suppressed)) if now.saturating_duration_since(*last) < PERIOD => {
                *suppressed += 1;
                None
            }
            Some((last, suppressed)) => {
                *last = now;
                Some(std::mem::take(suppressed))
            }
            None => {
                sites.insert(site, (now, 0));
                Some(0)
            }
        }
    }
}

/// The process's throttle, shared by every warning site that uses [`warn_throttled!`].
pub fn global() -> &'static Throttle {
    static GLOBAL: std::sync::OnceLock<Throttle> = std::sync::OnceLock::new();
    GLOBAL.get_or_init(Throttle::default)
}

/// `tracing::warn!` at most once per [`PERIOD`] for this call site, with a `suppressed` field
/// counting the lines dropped since the last one.
#[macro_export]
macro_rules! warn_throttled {
    ($($arg:tt)+) => {
        if let Some(suppressed) = $crate::throttle::global()
            .admit(concat!(file!(), ":", line!()), std::time::Instant::now())
        {
            tracing::warn!(suppressed, $($arg)+);
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_site_writes_once_per_period_and_then_counts_what_it_dropped() {
        let throttle = Throttle::default();
        let start = Instant::now();
        assert_eq!(throttle.admit("a", start), Some(0));
        for i in 1..=500 {
            let now = start + Duration::from_millis(i);
            assert_eq!(throttle.admit("a", now), None, "line {i} written");
        }
        // Another site has its own period.
        assert_eq!(throttle.admit("b", start), Some(0));
        assert_eq!(throttle.admit("a", start + PERIOD), Some(500));
        assert_eq!(throttle.admit("a", start + PERIOD * 2), Some(0));
    }
}
