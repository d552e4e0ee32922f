//! Single-flight: when many callers miss the same key at once, one computes the value and the
//! others wait for it (a bounded wait) instead of all computing it.
//!
//! Pure Rust; the Python layer releases the GIL before `wait` so the leader can run.
//!
//! A flight belongs to the fill that started it (`crate::store::Fill`, identified by its token),
//! not to a thread: only that fill's `finish` ends it, from whichever thread drops the fill. A
//! thread that already leads a key and asks for it again (a computation that reads its own key)
//! is told `Nested`: it computes too, without waiting on itself, but the flight stays its outer
//! fill's.

use std::time::Duration;

use ahash::RandomState;
use hashbrown::HashMap;

// parking_lot and std in normal builds; shuttle's scheduler-controlled versions under the
// `shuttle` feature (see `sync.rs`).
use crate::sync::{current, Arc, Condvar, Mutex, ThreadId};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Running,
    Done,
}

pub struct Flight {
    leader: ThreadId,
    /// The token of the fill that owns the flight: only its `finish` ends it.
    owner: u64,
    state: Mutex<State>,
    cv: Condvar,
}

/// What `Flights::begin` made of the caller.
pub enum Role {
    /// Compute the value, then call `finish` with the token given to `begin`.
    Leader,
    /// This thread already leads the key (re-entry): compute without waiting on itself; the
    /// flight stays the outer fill's (do not `finish` it).
    Nested,
    /// Someone else is computing: `wait` on this flight.
    Follower(Arc<Flight>),
}

/// How a wait ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waited {
    /// The leader finished (its value may be in the store, or it failed): read again.
    Finished,
    /// The bound passed first.
    TimedOut,
}

#[derive(Default)]
pub struct Flights {
    map: Mutex<HashMap<Box<str>, Arc<Flight>, RandomState>>,
}

impl Flights {
    /// Joins or starts the flight for `key`, owned by `owner` (a fill's token) if it starts. A
    /// thread that already leads `key` (its computation asks for the same key again) is told
    /// `Nested` rather than made to wait on itself.
    pub fn begin(&self, key: &str, owner: u64) -> Role {
        let me = current().id();
        let mut map = self.map.lock();
        match map.get(key) {
            Some(f) if f.leader != me => Role::Follower(f.clone()),
            Some(_) => Role::Nested,
            None => {
                let flight = Flight {
                    leader: me,
                    owner,
                    state: Mutex::new(State::Running),
                    cv: Condvar::new(),
                };
                map.insert(key.into(), Arc::new(flight));
                Role::Leader
            }
        }
    }

    /// Starts the flight for `key` only if none is in progress, not even one led by this thread
    /// (an early refresh whose computation reads its own key must not refresh it again); true if
    /// the caller now leads it, owned by `owner`. Never waits.
    pub fn try_begin(&self, key: &str, owner: u64) -> bool {
        let mut map = self.map.lock();
        if map.contains_key(key) {
            return false;
        }
        let flight = Flight {
            leader: current().id(),
            owner,
            state: Mutex::new(State::Running),
            cv: Condvar::new(),
        };
        map.insert(key.into(), Arc::new(flight));
        true
    }

    /// Ends the flight for `key` owned by `owner` and wakes its waiters; any other flight of the
    /// key (a later one, after this one ended) is left alone.
    pub fn finish(&self, key: &str, owner: u64) {
        let mut map = self.map.lock();
        if map.get(key).is_some_and(|f| f.owner == owner) {
            if let Some(f) = map.remove(key) {
                drop(map);
                *f.state.lock() = State::Done;
                f.cv.notify_all();
            }
        }
    }

    /// Forgets every flight in progress, without waking anyone: for a forked child, whose copies
    /// of these records were led by threads it does not have (see `crate::fork`).
    pub fn clear(&self) {
        let flights = std::mem::take(&mut *self.map.lock());
        drop(flights);
    }

    /// fork's prepare step (see `crate::fork`): takes the table's lock and keeps it.
    #[cfg(not(feature = "shuttle"))]
    pub fn lock_for_fork(&self) {
        std::mem::forget(self.map.lock());
    }

    /// Releases what `lock_for_fork` took.
    ///
    /// # Safety
    /// `lock_for_fork` ran in this thread (or in the thread of the parent that forked this child)
    /// and nothing released the lock since.
    #[cfg(not(feature = "shuttle"))]
    pub unsafe fn unlock_after_fork(&self) {
        self.map.force_unlock();
    }

    /// Number of flights in progress.
    pub fn len(&self) -> usize {
        self.map.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Flight {
    /// Blocks until the leader finishes or `limit` passes.
    pub fn wait(&self, limit: Duration) -> Waited {
        let mut state = self.state.lock();
        if *state == State::Done {
            return Waited::Finished;
        }
        let timed_out = self
            .cv
            .wait_while_for(&mut state, |s| *s == State::Running, limit)
            .timed_out();
        if timed_out && *state == State::Running {
            Waited::TimedOut
        } else {
            Waited::Finished
        }
    }
}

// Real threads and clocks; under the `shuttle` feature the primitives only work inside a shuttle
// run, so these give way to `shuttle_tests` below.
#[cfg(all(test, not(feature = "shuttle")))]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Barrier;
    use std::thread;

    #[test]
    fn one_leader_many_followers() {
        let flights = Arc::new(Flights::default());
        let computed = Arc::new(AtomicUsize::new(0));
        let barrier = Arc::new(Barrier::new(16));
        let handles: Vec<_> = (0..16u64)
            .map(|i| {
                let (flights, computed, barrier) =
                    (flights.clone(), computed.clone(), barrier.clone());
                thread::spawn(move || {
                    barrier.wait();
                    match flights.begin("k", i) {
                        Role::Leader => {
                            computed.fetch_add(1, Ordering::SeqCst);
                            thread::sleep(Duration::from_millis(100));
                            flights.finish("k", i);
                        }
                        Role::Follower(f) => {
                            assert_eq!(f.wait(Duration::from_secs(10)), Waited::Finished)
                        }
                        Role::Nested => panic!("no thread re-enters"),
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(computed.load(Ordering::SeqCst), 1);
        assert!(flights.is_empty());
    }

    #[test]
    fn waits_are_bounded_and_reentry_does_not_self_wait() {
        let flights = Arc::new(Flights::default());
        assert!(matches!(flights.begin("k", 1), Role::Leader));
        assert!(
            matches!(flights.begin("k", 2), Role::Nested),
            "same thread computes again, without waiting on itself"
        );
        // The nested fill's finish does not end the outer fill's flight.
        flights.finish("k", 2);
        assert_eq!(flights.len(), 1);
        let f2 = flights.clone();
        let waited = thread::spawn(move || match f2.begin("k", 3) {
            Role::Follower(f) => f.wait(Duration::from_millis(50)),
            _ => panic!("a second thread must follow"),
        })
        .join()
        .unwrap();
        assert_eq!(waited, Waited::TimedOut);
        flights.finish("k", 1);
        assert!(flights.is_empty());
    }

    #[test]
    fn try_begin_takes_only_a_free_flight() {
        let flights = Arc::new(Flights::default());
        assert!(flights.try_begin("k", 1));
        assert!(!flights.try_begin("k", 2), "not even its own leader");
        let f2 = flights.clone();
        let other = thread::spawn(move || (f2.try_begin("k", 3), f2.try_begin("j", 4)))
            .join()
            .unwrap();
        assert_eq!(other, (false, true));
        // A miss-path follower waits on a flight taken by `try_begin`, and is woken by `finish`.
        let f3 = flights.clone();
        let waiter = thread::spawn(move || match f3.begin("k", 5) {
            Role::Follower(f) => f.wait(Duration::from_secs(10)),
            _ => panic!("the flight is taken"),
        });
        thread::sleep(Duration::from_millis(20));
        flights.finish("k", 1);
        assert_eq!(waiter.join().unwrap(), Waited::Finished);
        assert!(flights.try_begin("k", 6), "free again after finish");
    }

    #[test]
    fn clear_forgets_a_flight_whose_leader_is_gone_and_the_next_caller_leads() {
        let flights = Arc::new(Flights::default());
        let f2 = flights.clone();
        // A leader that never finishes (as a thread the forked child does not have).
        thread::spawn(move || assert!(matches!(f2.begin("k", 1), Role::Leader)))
            .join()
            .unwrap();
        assert!(matches!(flights.begin("k", 2), Role::Follower(_)));
        flights.clear();
        assert!(flights.is_empty());
        assert!(matches!(flights.begin("k", 3), Role::Leader));
        // The gone leader's finish (a fill inherited across fork) ends nothing.
        flights.finish("k", 1);
        assert_eq!(flights.len(), 1);
        flights.finish("k", 3);
        assert!(flights.is_empty());
    }

    #[test]
    fn only_the_owners_finish_ends_a_flight_from_whichever_thread() {
        let flights = Arc::new(Flights::default());
        assert!(matches!(flights.begin("k", 1), Role::Leader));
        let f2 = flights.clone();
        thread::spawn(move || f2.finish("k", 2)).join().unwrap();
        assert_eq!(flights.len(), 1, "a finish by another fill is ignored");
        // The owner's fill may be dropped on another thread: its finish still ends the flight.
        let f3 = flights.clone();
        thread::spawn(move || f3.finish("k", 1)).join().unwrap();
        assert!(flights.is_empty());
    }
}

/// The single-flight protocol under shuttle's randomized scheduler: every test body runs thousands
/// of times, each under a different (seeded, replayable) interleaving of its threads, with
/// `crate::sync` handing `Flights` shuttle's scheduler-controlled primitives. A follower that
/// would wait forever makes shuttle report a deadlock; every other property is asserted.
/// Run: `cargo test --no-default-features --features shuttle flight::`.
#[cfg(all(test, feature = "shuttle"))]
mod shuttle_tests {
    use super::*;
    use crate::sync::spawn;
    use shuttle::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
    use shuttle::thread::yield_now;

    const ITERATIONS: usize = 5000;
    /// A bound shuttle never lets pass: a follower's wait must end by the leader's `finish`.
    const FOREVER: Duration = Duration::MAX;
    /// A bound the `crate::sync` model may let pass at any scheduling point.
    const BOUNDED: Duration = Duration::from_millis(10);

    /// Shared state of one run: the flights, the "cache" (whether a value was stored) and how
    /// many callers are leading the key right now.
    #[derive(Default)]
    struct World {
        flights: Flights,
        stored: AtomicBool,
        leading: AtomicUsize,
        computed: AtomicUsize,
        /// The next fill token (a flight's owner).
        next: AtomicU64,
    }

    impl World {
        /// A fresh token, as each `store::Fill` gets one.
        fn token(&self) -> u64 {
            self.next.fetch_add(1, Ordering::SeqCst) + 1
        }

        /// A leader's critical section: asserts it is the only one, and yields inside it so
        /// shuttle can schedule anyone else there.
        fn lead(&self, store: bool) {
            assert_eq!(
                self.leading.fetch_add(1, Ordering::SeqCst),
                0,
                "two leaders"
            );
            self.computed.fetch_add(1, Ordering::SeqCst);
            yield_now();
            if store {
                self.stored.store(true, Ordering::SeqCst);
            }
            assert_eq!(self.leading.fetch_sub(1, Ordering::SeqCst), 1);
        }

        /// `RustCache.get_or_set`'s use of flights: miss, `begin`; lead (re-entering the key
        /// once, as a `default()` that reads its own key does) and `finish`, or wait and read
        /// again, computing without the flight if the value is still missing. A leader whose
        /// computation fails (`fail`) stores nothing. Returns how the wait ended, if it waited.
        fn get_or_set(&self, limit: Duration, fail: bool) -> Option<Waited> {
            if self.stored.load(Ordering::SeqCst) {
                return None;
            }
            let me = self.token();
            match self.flights.begin("k", me) {
                Role::Leader => {
                    let inner = self.token();
                    assert!(
                        matches!(self.flights.begin("k", inner), Role::Nested),
                        "a leader re-entering its key must not follow itself"
                    );
                    // The nested fill ends: the flight stays the outer one's.
                    self.flights.finish("k", inner);
                    self.lead(!fail);
                    self.flights.finish("k", me);
                    None
                }
                Role::Nested => panic!("this thread leads nothing yet"),
                Role::Follower(flight) => {
                    let waited = flight.wait(limit);
                    if waited == Waited::Finished {
                        assert_eq!(*flight.state.lock(), State::Done, "woken before finish");
                    }
                    if !self.stored.load(Ordering::SeqCst) {
                        self.computed.fetch_add(1, Ordering::SeqCst);
                    }
                    Some(waited)
                }
            }
        }
    }

    /// Runs `body(world, i)` on `n` shuttle threads and returns the world once all joined.
    fn run<R: Send + 'static>(
        n: usize,
        body: impl Fn(&World, usize) -> R + Send + Sync + 'static,
    ) -> (Arc<World>, Vec<R>) {
        let world = Arc::new(World::default());
        let body = Arc::new(body);
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let (world, body) = (world.clone(), body.clone());
                spawn(move || body(&world, i))
            })
            .collect();
        let results = handles.into_iter().map(|h| h.join().unwrap()).collect();
        (world, results)
    }

    #[test]
    fn one_leader_at_a_time_and_every_wait_ends() {
        shuttle::check_random(
            || {
                let (world, waits) = run(4, |w, _| w.get_or_set(FOREVER, false));
                assert!(world.flights.is_empty(), "a flight outlived its leader");
                assert!(world.stored.load(Ordering::SeqCst));
                // With unbounded waits nobody gives up on the leader.
                assert!(waits.iter().flatten().all(|w| *w == Waited::Finished));
                assert_eq!(world.leading.load(Ordering::SeqCst), 0);
            },
            ITERATIONS,
        );
    }

    #[test]
    fn followers_of_a_failed_leader_wake_and_a_new_leader_can_start() {
        shuttle::check_random(
            || {
                // Threads 0 and 1 fail their computation; 2 and 3 store it.
                let (world, _) = run(4, |w, i| {
                    w.get_or_set(FOREVER, i < 2);
                    // A second round: whoever still misses begins again.
                    w.get_or_set(FOREVER, false);
                });
                assert!(world.flights.is_empty());
                assert!(world.stored.load(Ordering::SeqCst));
            },
            ITERATIONS,
        );
    }

    #[test]
    fn pct_one_leader_at_a_time() {
        // PCT finds bugs that need a few specific preemptions with guaranteed probability.
        shuttle::check_pct(
            || {
                let (world, _) = run(3, |w, i| w.get_or_set(FOREVER, i == 0));
                assert!(world.flights.is_empty());
            },
            ITERATIONS,
            3,
        );
    }

    #[test]
    fn finish_by_a_non_owner_is_ignored() {
        shuttle::check_random(
            || {
                let world = Arc::new(World::default());
                let finished = Arc::new(AtomicBool::new(false));
                let owner = world.token();
                assert!(matches!(world.flights.begin("k", owner), Role::Leader));
                // An intruder whose fill never led "k" finishes it, concurrently with a follower.
                let intruder = {
                    let world = world.clone();
                    spawn(move || world.flights.finish("k", world.token()))
                };
                let follower = {
                    let (world, finished) = (world.clone(), finished.clone());
                    spawn(move || {
                        let me = world.token();
                        match world.flights.begin("k", me) {
                            Role::Follower(f) => {
                                assert_eq!(f.wait(FOREVER), Waited::Finished);
                                assert!(finished.load(Ordering::SeqCst), "woken by a non-owner");
                            }
                            Role::Leader => {
                                assert!(finished.load(Ordering::SeqCst), "led while another leads");
                                world.flights.finish("k", me);
                            }
                            Role::Nested => panic!("another thread leads"),
                        }
                    })
                };
                intruder.join().unwrap();
                assert_eq!(world.flights.len(), 1, "a non-owner ended the flight");
                yield_now();
                finished.store(true, Ordering::SeqCst);
                world.flights.finish("k", owner);
                follower.join().unwrap();
                assert!(world.flights.is_empty());
            },
            ITERATIONS,
        );
    }

    #[test]
    fn a_stale_finish_does_not_end_the_next_leaders_flight() {
        shuttle::check_random(
            || {
                // Each thread leads, then finishes twice (as a fill's `put` and then its drop
                // do): the second finish may land after another thread took the key, and must
                // leave that flight alone, or a third thread would lead alongside it.
                let (world, _) = run(3, |w, _| {
                    let me = w.token();
                    match w.flights.begin("k", me) {
                        Role::Leader => {
                            w.lead(false);
                            w.flights.finish("k", me);
                            yield_now();
                            w.flights.finish("k", me);
                        }
                        Role::Follower(f) => {
                            f.wait(FOREVER);
                            let again = w.token();
                            if let Role::Leader = w.flights.begin("k", again) {
                                w.lead(false);
                                w.flights.finish("k", again);
                            }
                        }
                        Role::Nested => panic!("this thread leads nothing yet"),
                    }
                });
                assert!(world.flights.is_empty());
            },
            ITERATIONS,
        );
    }

    #[test]
    fn try_begin_never_makes_a_second_leader() {
        shuttle::check_random(
            || {
                // Early refreshes (`try_begin`) race misses (`begin`) on one key.
                let (world, _) = run(4, |w, i| {
                    if i % 2 == 0 {
                        let me = w.token();
                        if w.flights.try_begin("k", me) {
                            assert!(
                                !w.flights.try_begin("k", w.token()),
                                "not even its own leader"
                            );
                            w.lead(true);
                            w.flights.finish("k", me);
                        }
                    } else {
                        w.get_or_set(FOREVER, false);
                    }
                });
                assert!(world.flights.is_empty());
            },
            ITERATIONS,
        );
    }

    #[test]
    fn bounded_waits_time_out_or_finish_and_nothing_leaks() {
        // Tallies across iterations, read outside shuttle: std atomics.
        use std::sync::atomic::AtomicUsize as StdAtomicUsize;
        static TIMED_OUT: StdAtomicUsize = StdAtomicUsize::new(0);
        static FINISHED: StdAtomicUsize = StdAtomicUsize::new(0);
        shuttle::check_random(
            || {
                let (world, waits) = run(4, |w, i| w.get_or_set(BOUNDED, i == 0));
                for waited in waits.into_iter().flatten() {
                    let counter = match waited {
                        Waited::TimedOut => &TIMED_OUT,
                        Waited::Finished => &FINISHED,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                assert!(world.flights.is_empty());
                // Whoever timed out or found the leader failed computed the value itself.
                assert!(world.computed.load(Ordering::SeqCst) >= 1);
            },
            ITERATIONS,
        );
        // The model did exercise both endings of a bounded wait.
        assert!(TIMED_OUT.load(Ordering::Relaxed) > 0);
        assert!(FINISHED.load(Ordering::Relaxed) > 0);
    }
}
