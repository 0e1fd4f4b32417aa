//! How an answer reports where its time went: the W3C `Server-Timing` value every door sends
//! (plugin stages, the mesh hop, queue wait, inference, total).

use crate::dispatch::Served;
use http::HeaderName;
use meshserve_host::InferResponse;
use std::time::Duration;

// A constant: a `&str` name is parsed (and a custom one allocated) per use.
/// The `Server-Timing` header.
pub const SERVER_TIMING: HeaderName = HeaderName::from_static("server-timing");

/// The `Server-Timing` value for a model's answer; `extra` holds stages that ran outside the
/// engine (plugins, the hop), already formatted.
pub fn server_timing(response: &InferResponse, extra: &str, total: Duration) -> String {
    let t = &response.timings;
    format!(
        "{extra}queue;dur={}, infer;dur={};desc=\"batch {}\", total;dur={}",
        Ms(t.queue),
        Ms(t.infer),
        t.batch_size,
        Ms(total)
    )
}

/// The mesh hop of a forwarded answer as a `Server-Timing` part (empty when served here).
pub fn hop_timing(served: &Served) -> String {
    match &served.hop {
        Some((hop, node)) => format!("forward;dur={};desc=\"{node}\", ", Ms(*hop)),
        None => String::new(),
    }
}

/// A duration as `Server-Timing` writes it: milliseconds with three decimals. Integer
/// arithmetic, because `{:.3}` on an `f64` takes the exact (big-number) formatting path, which
/// showed in the hot path's profile.
pub struct Ms(pub Duration);

impl std::fmt::Display for Ms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Rounded to the nearest microsecond, as `{:.3}` would; in u64, since `as_nanos`'
        // u128 divides by a library call.
        let us = self
            .0
            .as_secs()
            .saturating_mul(1_000_000)
            .saturating_add(u64::from((self.0.subsec_nanos() + 500) / 1000));
        write!(f, "{}.{:03}", us / 1000, us % 1000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_timing_durations_are_milliseconds_with_three_decimals() {
        assert_eq!(Ms(Duration::from_micros(1_234_567)).to_string(), "1234.567");
        assert_eq!(Ms(Duration::from_micros(42)).to_string(), "0.042");
        assert_eq!(Ms(Duration::from_nanos(499)).to_string(), "0.000");
        assert_eq!(Ms(Duration::from_nanos(1_500)).to_string(), "0.002");
        assert_eq!(
            Ms(Duration::from_nanos(999_999_600)).to_string(),
            "1000.000"
        );
        assert_eq!(Ms(Duration::from_secs(2)).to_string(), "2000.000");
        assert_eq!(
            Ms(Duration::new(3, 999_999_500)).to_string(),
            "4000.000",
            "rounding carries into the seconds"
        );
    }
}
