//! The synchronisation primitives of the store, from one place, so that its concurrency can be
//! checked under a randomized scheduler.
//!
//! Every module of the store (`store/`, `shard.rs`, `tags.rs`, `flight.rs`, `stats.rs`, and
//! NearCache's `Graveyard`) takes its locks, atomics, `Arc`, thread handles and hasher seeds from
//! here. Normal builds re-export `parking_lot`, `std` and `ahash` as they are: the same types, no
//! wrapper, no cost. With the
//! `shuttle` cargo feature (tests only, never in the wheel) they come from the `shuttle` crate,
//! wrapped to keep `parking_lot`'s API, so the same store code runs under `shuttle::check_*`: each
//! lock, atomic operation and yield is a point where shuttle's scheduler may switch threads.
//!
//! What stays outside: `fork.rs` (it locks and force-unlocks every lock around a real `fork()`;
//! under `shuttle` it keeps only its generation counter, and the stores' fork hooks compile out);
//! an entry's S3-FIFO hit counter (a `std` `AtomicU8` inside the entry's packed 17-byte header: a
//! racy increment under the read lock loses a hit at worst, nothing a schedule could break); the
//! PyO3 layer (`python/`, which cannot be built with `shuttle`); and NearCache's listener and lease
//! (`near/` but its graveyard: an OS thread on a socket and real clocks; what it does to the store
//! is `invalidate_key` and `clear`, which the models cover). The store reads no clock: every
//! operation takes `now` from its caller, so a model chooses time itself.

pub use std::sync::{Arc, Weak};

#[cfg(not(feature = "shuttle"))]
pub use parking_lot::{Condvar, Mutex, RwLock, RwLockWriteGuard};
#[cfg(not(feature = "shuttle"))]
pub use std::sync::atomic;
#[cfg(not(feature = "shuttle"))]
pub use std::thread::{current, yield_now, ThreadId};

#[cfg(feature = "shuttle")]
pub use self::shuttle_impl::{Condvar, Mutex, RwLock, RwLockWriteGuard};
#[cfg(feature = "shuttle")]
pub use shuttle::sync::atomic;
#[cfg(feature = "shuttle")]
pub use shuttle::thread::{current, yield_now, ThreadId};
#[cfg(all(test, feature = "shuttle"))]
pub use shuttle::thread::{scope, spawn};

/// The hasher of a store's shards and of its tag table: seeded per process in normal builds
/// (ahash's own seeding); under `shuttle` from the scheduler's seeded random source, so that which
/// keys share a shard varies from one schedule to the next and a failing schedule replays exactly.
#[inline]
pub fn random_state() -> ahash::RandomState {
    #[cfg(not(feature = "shuttle"))]
    {
        ahash::RandomState::new()
    }
    #[cfg(feature = "shuttle")]
    {
        use shuttle::rand::{thread_rng, Rng};
        let mut rng = thread_rng();
        ahash::RandomState::with_seeds(rng.gen(), rng.gen(), rng.gen(), rng.gen())
    }
}

// Shuttle's primitives panic outside a `shuttle::check_*` run: an extension built with them would
// fail on its first operation. Refuse the combination at compile time.
#[cfg(all(feature = "shuttle", feature = "python"))]
compile_error!(
    "the `shuttle` feature is for `cargo test --no-default-features --features shuttle` only"
);

#[cfg(feature = "shuttle")]
mod shuttle_impl {
    use std::ops::{Deref, DerefMut};
    use std::sync::{PoisonError, TryLockError};
    use std::time::Duration;

    use shuttle::rand::{thread_rng, Rng};

    /// `parking_lot::Mutex`'s API over `shuttle::sync::Mutex` (no poisoning: a panicking test
    /// fails the whole shuttle run anyway).
    #[derive(Default)]
    pub struct Mutex<T>(shuttle::sync::Mutex<T>);

    /// The guard keeps shuttle's guard in an `Option` so `Condvar` can hand it to shuttle's
    /// by-value `wait` and put it back, as `parking_lot`'s `&mut guard` API requires.
    pub struct MutexGuard<'a, T> {
        mutex: &'a shuttle::sync::Mutex<T>,
        inner: Option<shuttle::sync::MutexGuard<'a, T>>,
    }

    impl<T> Mutex<T> {
        pub const fn new(value: T) -> Self {
            Self(shuttle::sync::Mutex::new(value))
        }

        pub fn lock(&self) -> MutexGuard<'_, T> {
            MutexGuard {
                mutex: &self.0,
                inner: Some(self.0.lock().unwrap_or_else(PoisonError::into_inner)),
            }
        }
    }

    impl<T> Deref for MutexGuard<'_, T> {
        type Target = T;
        fn deref(&self) -> &T {
            self.inner.as_ref().expect("guard is held outside a wait")
        }
    }

    impl<T> DerefMut for MutexGuard<'_, T> {
        fn deref_mut(&mut self) -> &mut T {
            self.inner.as_mut().expect("guard is held outside a wait")
        }
    }

    /// `parking_lot::RwLock`'s API over `shuttle::sync::RwLock` (the calls the store makes).
    #[derive(Default)]
    pub struct RwLock<T>(shuttle::sync::RwLock<T>);

    pub use shuttle::sync::{RwLockReadGuard, RwLockWriteGuard};

    impl<T> RwLock<T> {
        pub const fn new(value: T) -> Self {
            Self(shuttle::sync::RwLock::new(value))
        }

        pub fn read(&self) -> RwLockReadGuard<'_, T> {
            self.0.read().unwrap_or_else(PoisonError::into_inner)
        }

        pub fn write(&self) -> RwLockWriteGuard<'_, T> {
            self.0.write().unwrap_or_else(PoisonError::into_inner)
        }

        pub fn try_write(&self) -> Option<RwLockWriteGuard<'_, T>> {
            match self.0.try_write() {
                Ok(guard) => Some(guard),
                Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
                Err(TryLockError::WouldBlock) => None,
            }
        }

        /// Whether any thread holds it, read or write (taking it for writing, at once released,
        /// is the only way to ask shuttle's lock).
        pub fn is_locked(&self) -> bool {
            self.try_write().is_none()
        }
    }

    /// Like `parking_lot::WaitTimeoutResult`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct WaitTimeoutResult(bool);

    impl WaitTimeoutResult {
        pub fn timed_out(self) -> bool {
            self.0
        }
    }

    /// `parking_lot::Condvar`'s API over `shuttle::sync::Condvar`.
    ///
    /// Shuttle's own timed waits never time out (and a thread blocked in shuttle cannot be woken
    /// by time), so a finite bound is modelled here: the waiter polls, releasing the lock, letting
    /// other threads run and re-taking it, and after each turn the (shuttle-seeded, replayable)
    /// random source may decide the bound has passed; it then reports a timeout without
    /// re-checking the condition, exactly as `parking_lot` does. Passing at any point is a
    /// superset of what real clocks do, and a bounded wait ends even if nobody notifies. A bound
    /// of `Duration::MAX` never passes: the waiter blocks until notified, so a lost notification
    /// is a deadlock shuttle reports.
    #[derive(Default)]
    pub struct Condvar(shuttle::sync::Condvar);

    impl Condvar {
        pub const fn new() -> Self {
            Self(shuttle::sync::Condvar::new())
        }

        pub fn notify_all(&self) -> usize {
            self.0.notify_all();
            0
        }

        pub fn wait_while_for<T, F>(
            &self,
            guard: &mut MutexGuard<'_, T>,
            mut condition: F,
            timeout: Duration,
        ) -> WaitTimeoutResult
        where
            F: FnMut(&mut T) -> bool,
        {
            while condition(guard) {
                let inner = guard.inner.take().expect("guard is held outside a wait");
                if timeout == Duration::MAX {
                    guard.inner = Some(self.0.wait(inner).unwrap_or_else(PoisonError::into_inner));
                    continue;
                }
                drop(inner);
                shuttle::thread::yield_now();
                guard.inner = Some(guard.mutex.lock().unwrap_or_else(PoisonError::into_inner));
                if thread_rng().gen_ratio(1, 4) {
                    return WaitTimeoutResult(true);
                }
            }
            WaitTimeoutResult(false)
        }
    }
}

/// The shuttle model itself: a wrong model would make `flight.rs`'s shuttle tests prove nothing.
#[cfg(all(test, feature = "shuttle"))]
mod tests {
    use super::*;
    use std::time::Duration;

    const ITERATIONS: usize = 2000;

    /// A flag, its condvar, and a thread that sets it and notifies when `notify` is true.
    fn waiter(notify: bool, limit: Duration) -> (bool, bool) {
        let pair = Arc::new((Mutex::new(false), Condvar::new()));
        let setter = notify.then(|| {
            let pair = pair.clone();
            spawn(move || {
                *pair.0.lock() = true;
                pair.1.notify_all();
            })
        });
        let mut set = pair.0.lock();
        let timed_out = pair.1.wait_while_for(&mut set, |s| !*s, limit).timed_out();
        let seen = *set;
        drop(set);
        if let Some(setter) = setter {
            setter.join().unwrap();
        }
        (timed_out, seen)
    }

    #[test]
    fn an_unbounded_wait_ends_only_by_a_notification() {
        shuttle::check_random(
            || assert_eq!(waiter(true, Duration::MAX), (false, true)),
            ITERATIONS,
        );
    }

    #[test]
    #[should_panic(expected = "deadlock")]
    fn an_unbounded_wait_nobody_notifies_is_a_reported_deadlock() {
        shuttle::check_random(
            || {
                waiter(false, Duration::MAX);
            },
            1,
        );
    }

    #[test]
    fn a_bounded_wait_nobody_notifies_times_out() {
        shuttle::check_random(
            || assert_eq!(waiter(false, Duration::from_millis(1)), (true, false)),
            ITERATIONS,
        );
    }

    #[test]
    fn a_bounded_wait_ends_either_way_and_never_early() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static OUTCOMES: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];
        shuttle::check_random(
            || {
                let (timed_out, seen) = waiter(true, Duration::from_millis(1));
                // Not timed out means the condition was seen false; a timeout may race the set.
                assert!(timed_out || seen, "returned before the condition held");
                OUTCOMES[usize::from(timed_out)].fetch_add(1, Ordering::Relaxed);
            },
            ITERATIONS,
        );
        assert!(OUTCOMES.iter().all(|n| n.load(Ordering::Relaxed) > 0));
    }
}
