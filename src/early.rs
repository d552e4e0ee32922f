//! Probabilistic early refresh, "XFetch": Vattani, Chierichetti and Lowenstein, *Optimal
//! Probabilistic Cache Stampede Prevention*, PVLDB 8(8), 2015.
//!
//! A reader of a live entry treats it as a miss (and recomputes it) when
//! `now - delta * beta * ln(u) >= expiry`, where `delta` is how long the last computation of the
//! value took, `beta > 0` tunes how early, and `u` is uniform in (0, 1]. With `t = expiry - now`
//! time left, a reader refreshes with probability `exp(-t / (delta * beta))`: almost never while
//! plenty of time is left, more and more likely as expiry nears, so a hot key is usually
//! recomputed by one reader shortly before it expires rather than by all readers after.
//!
//! This is the only place the decision is made; the Python layer supplies `u` (so tests can seed
//! it) and stores `delta` with the entry.

use crate::clock::NEVER;

/// Whether a reader at `now` holding uniform draw `u` in (0, 1] should recompute the entry that
/// expires at `expires` and whose value took `delta` nanoseconds to compute (XFetch, VLDB 2015).
///
/// Never for an entry without expiry, without a recorded compute time, or with `beta <= 0`.
pub fn should_refresh(now: u64, expires: u64, delta: u64, beta: f64, u: f64) -> bool {
    if expires == NEVER || delta == 0 || beta.is_nan() || beta <= 0.0 {
        return false;
    }
    // now - delta*beta*ln(u) >= expires, in the form that cannot overflow the u64 stamps:
    // -delta*beta*ln(u) >= expires - now (the left side is >= 0 since ln(u) <= 0 for u <= 1).
    let left = expires.saturating_sub(now) as f64;
    -(delta as f64) * beta * u.ln() >= left
}

// Under `shuttle` the store's primitives work only inside a shuttle run: see the models.
#[cfg(all(test, not(feature = "shuttle")))]
mod tests {
    use super::*;
    use crate::store::{Limits, Store, Weigh};

    const S: u64 = 1_000_000_000;

    #[test]
    fn decision_follows_the_formula() {
        // delta 2 s, beta 1.5: refresh iff -3 s * ln(u) >= time left.
        let (now, delta, beta) = (100 * S, 2 * S, 1.5);
        for left in [S / 10, S, 3 * S, 10 * S] {
            let expires = now + left;
            // The threshold draw: u* = exp(-left / (delta * beta)); any u <= u* refreshes.
            let u_star = (-(left as f64) / (delta as f64 * beta)).exp();
            assert!(should_refresh(now, expires, delta, beta, u_star * 0.999));
            assert!(!should_refresh(now, expires, delta, beta, u_star * 1.001));
        }
        // u = 1 never refreshes a live entry; an entry at its expiry always does.
        assert!(!should_refresh(now, now + 1, delta, beta, 1.0));
        assert!(should_refresh(now, now, delta, beta, 1.0));
        assert!(should_refresh(now, now - 5, delta, beta, 0.5));
    }

    #[test]
    fn never_without_beta_delta_or_expiry() {
        let now = 10 * S;
        for u in [1e-300, 0.001, 0.5, 1.0] {
            assert!(!should_refresh(now, now + 1, S, 0.0, u));
            assert!(!should_refresh(now, now + 1, S, -1.0, u));
            assert!(!should_refresh(now, now + 1, S, f64::NAN, u));
            assert!(!should_refresh(now, now + 1, 0, 1.0, u));
            assert!(!should_refresh(now, NEVER, S, 1.0, u));
        }
    }

    #[test]
    fn refresh_rate_matches_exp_model() {
        // Evenly spaced draws stand in for a uniform source: the fraction that refreshes at time
        // left t must be exp(-t / (delta * beta)).
        let (now, delta, beta) = (0, S, 2.0);
        let n = 100_000;
        for left in [S / 2, 2 * S, 4 * S] {
            let hits = (1..=n)
                .filter(|i| should_refresh(now, left, delta, beta, *i as f64 / n as f64))
                .count() as f64;
            let expected = (-(left as f64) / (delta as f64 * beta)).exp();
            assert!(
                (hits / n as f64 - expected).abs() < 1e-3,
                "{hits} at {left}"
            );
        }
    }

    struct V;
    impl Weigh for V {
        fn weight(&self) -> usize {
            1
        }
    }

    impl crate::entry::Pack for V {
        fn from_tag(_: u8) -> &'static Self {
            &V
        }
    }

    #[test]
    fn store_keeps_delta_with_the_entry_it_was_recorded_for() {
        let store: Store<V> = Store::new(4);
        let limits = Limits::default();
        let now = 5 * S;
        let read = |store: &Store<V>| store.get_entry("k", now, |e| (e.expires(), e.delta()));
        assert_eq!(read(&store), None);
        store.set("k", V, now + S, Vec::new(), &limits, now);
        assert_eq!(
            read(&store),
            Some((now + S, 0)),
            "a plain set records no delta"
        );
        assert!(store.set_delta("k", now + S, 7_000, &limits, now));
        assert_eq!(read(&store), Some((now + S, 7_000)));
        // Kept to the microsecond, rounded up: a recorded time never reads as none.
        assert!(store.set_delta("k", now + S, 7, &limits, now));
        assert_eq!(read(&store), Some((now + S, 1_000)));
        // A newer value (another expiry stamp) is not given the older computation's delta.
        store.set("k", V, now + 2 * S, Vec::new(), &limits, now);
        assert!(!store.set_delta("k", now + S, 9, &limits, now));
        assert_eq!(read(&store), Some((now + 2 * S, 0)));
        assert!(!store.set_delta("missing", now + S, 9, &limits, now));
        // An expired entry is a miss for `get_entry` too.
        assert_eq!(store.get_entry("k", now + 3 * S, |e| e.delta()), None);
    }
}
