//! NearCache's fill placeholders (`fill.rs`) under shuttle's scheduler (`crate::sync`): fills
//! racing the invalidations of their key and each other, in thousands of seeded, replayable
//! interleavings. (A file of its own beside `fill.rs` while fills become guard objects there.)
//! Run: `cargo test --no-default-features --features shuttle store::fill`.

use super::*;
use crate::clock::NEVER;
use crate::store::testing::model::{books, check, Num, Tally};
use crate::store::testing::*;
use crate::sync::atomic::{AtomicU64, Ordering::SeqCst};
use crate::sync::scope;

const ITERATIONS: usize = 3_000;

/// "Redis" holds version 1 of `k`. Two fills of `k` (placeholder, GET from Redis, put) run
/// while another client writes version 2 to Redis, after which the listener delivers the
/// invalidation (`invalidate_key`). Once all is done, L1 holds no version of `k` but Redis's
/// current one (or none), no placeholder is left, and the books are the entries held.
fn fills(policy: Policy, shards: usize) {
    let tally = Tally::default();
    let store: Store<Num> = Store::with_policy(shards, policy);
    let lim = limits(100, None);
    let redis = AtomicU64::new(1);
    let fill = || {
        let token = store.fill_begin("k", &lim, 1);
        let version = redis.load(SeqCst);
        let put = store.fill_put(
            "k",
            token,
            tally.num(version, 8),
            NEVER,
            Vec::new(),
            false,
            &lim,
            1,
        );
        assert!(matches!(put, Put::Stored | Put::Stale), "{put:?}");
    };
    scope(|s| {
        s.spawn(fill);
        s.spawn(fill);
        s.spawn(|| {
            redis.store(2, SeqCst);
            store.invalidate_key("k");
        });
    });
    let got = store.get("k", 1, |v| v.n);
    assert!(
        matches!(got, None | Some(2)),
        "L1 kept version {got:?} after its invalidation"
    );
    assert!(store.fills.is_empty(), "a placeholder was left behind");
    assert_eq!(store.bytes(), books(&store));
    assert_eq!(tally.alive(), store.len());
    store.clear();
    assert_eq!((store.len(), store.bytes(), tally.alive()), (0, 0, 0));
}

#[test]
fn lru_a_fill_never_stores_a_value_invalidated_since_it_began() {
    check(ITERATIONS, || fills(Policy::Lru, 1));
}

#[test]
fn s3_a_fill_never_stores_a_value_invalidated_since_it_began() {
    check(ITERATIONS, || fills(Policy::S3Fifo, 2));
}
