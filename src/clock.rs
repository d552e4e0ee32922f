//! Monotonic time for expiry: nanoseconds since the first use of the clock in this process.
//!
//! A monotonic clock means a wall-clock jump (NTP, DST) never expires or revives entries.

use std::sync::OnceLock;
use std::time::Instant;

/// An expiry stamp that never comes.
pub const NEVER: u64 = u64::MAX;

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Nanoseconds since the process-wide epoch.
#[inline]
pub fn now() -> u64 {
    epoch().elapsed().as_nanos() as u64
}

/// The expiry stamp for a timeout of `seconds` from `now`; `None` means never.
/// Zero and negative timeouts give a stamp already in the past.
pub fn deadline(now: u64, seconds: Option<f64>) -> u64 {
    match seconds {
        None => NEVER,
        Some(s) if s.is_nan() || s <= 0.0 => 0,
        Some(s) => {
            let ns = s * 1e9;
            if ns >= (NEVER - now) as f64 {
                NEVER - 1
            } else {
                now + ns as u64
            }
        }
    }
}

/// Seconds left until `expires`, as seen from `now` (`None` for no expiry).
pub fn remaining(now: u64, expires: u64) -> Option<f64> {
    if expires == NEVER {
        None
    } else {
        Some(expires.saturating_sub(now) as f64 / 1e9)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines() {
        assert_eq!(deadline(10, None), NEVER);
        assert_eq!(deadline(10, Some(0.0)), 0);
        assert_eq!(deadline(10, Some(-5.0)), 0);
        assert_eq!(deadline(10, Some(f64::NAN)), 0);
        assert_eq!(deadline(10, Some(1.5)), 10 + 1_500_000_000);
        assert_eq!(deadline(10, Some(1e300)), NEVER - 1);
        assert_eq!(remaining(5, NEVER), None);
        assert_eq!(remaining(5, 3), Some(0.0));
    }

    #[test]
    fn monotonic() {
        let a = now();
        let b = now();
        assert!(b >= a);
    }
}
