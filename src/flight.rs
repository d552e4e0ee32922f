//! Single-flight: when many callers miss the same key at once, one computes the value and the
//! others wait for it (a bounded wait) instead of all computing it.
//!
//! Pure Rust; the Python layer releases the GIL before `wait` so the leader can run.

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
    state: Mutex<State>,
    cv: Condvar,
}

/// What `Flights::begin` made of the caller.
pub enum Role {
    /// Compute the value, then call `finish`.
    Leader,
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
    /// Joins or starts the flight for `key`. A thread that already leads `key` (its computation
    /// asks for the same key again) is made a leader again rather than waiting on itself.
    pub fn begin(&self, key: &str) -> Role {
        let me = current().id();
        let mut map = self.map.lock();
        match map.get(key) {
            Some(f) if f.leader != me => Role::Follower(f.clone()),
            Some(_) => Role::Leader,
            None => {
                let flight = Flight {
                    leader: me,
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
    /// the caller now leads it. Never waits.
    pub fn try_begin(&self, key: &str) -> bool {
        let mut map = self.map.lock();
        if map.contains_key(key) {
            return false;
        }
        let flight = Flight {
            leader: current().id(),
            state: Mutex::new(State::Running),
            cv: Condvar::new(),
        };
        map.insert(key.into(), Arc::new(flight));
        true
    }

    /// Ends the flight for `key` led by this thread and wakes its waiters.
    pub fn finish(&self, key: &str) {
        let me = current().id();
        let mut map = self.map.lock();
        if map.get(key).is_some_and(|f| f.leader == me) {
            if let Some(f) = map.remove(key) {
                drop(map);
                *f.state.lock() = State::Done;
                f.cv.notify_all();
            }
        }
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
        let handles: Vec<_> = (0..16)
            .map(|_| {
                let (flights, computed, barrier) =
                    (flights.clone(), computed.clone(), barrier.clone());
                thread::spawn(move || {
                    barrier.wait();
                    match flights.begin("k") {
                        Role::Leader => {
                            computed.fetch_add(1, Ordering::SeqCst);
                            thread::sleep(Duration::from_millis(100));
                            flights.finish("k");
                        }
                        Role::Follower(f) => {
                            assert_eq!(f.wait(Duration::from_secs(10)), Waited::Finished)
                        }
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
        assert!(matches!(flights.begin("k"), Role::Leader));
        assert!(
            matches!(flights.begin("k"), Role::Leader),
            "same thread leads again"
        );
        let f2 = flights.clone();
        let waited = thread::spawn(move || match f2.begin("k") {
            Role::Follower(f) => f.wait(Duration::from_millis(50)),
            Role::Leader => panic!("a second thread must follow"),
        })
        .join()
        .unwrap();
        assert_eq!(waited, Waited::TimedOut);
        flights.finish("k");
        assert!(flights.is_empty());
    }

    #[test]
    fn try_begin_takes_only_a_free_flight() {
        let flights = Arc::new(Flights::default());
        assert!(flights.try_begin("k"));
        assert!(!flights.try_begin("k"), "not even its own leader");
        let f2 = flights.clone();
        let other = thread::spawn(move || (f2.try_begin("k"), f2.try_begin("j")))
            .join()
            .unwrap();
        assert_eq!(other, (false, true));
        // A miss-path follower waits on a flight taken by `try_begin`, and is woken by `finish`.
        let f3 = flights.clone();
        let waiter = thread::spawn(move || match f3.begin("k") {
            Role::Follower(f) => f.wait(Duration::from_secs(10)),
            Role::Leader => panic!("the flight is taken"),
        });
        thread::sleep(Duration::from_millis(20));
        flights.finish("k");
        assert_eq!(waiter.join().unwrap(), Waited::Finished);
        assert!(flights.try_begin("k"), "free again after finish");
    }

    #[test]
    fn finish_by_another_thread_is_ignored() {
        let flights = Arc::new(Flights::default());
        assert!(matches!(flights.begin("k"), Role::Leader));
        let f2 = flights.clone();
        thread::spawn(move || f2.finish("k")).join().unwrap();
        assert_eq!(flights.len(), 1);
        flights.finish("k");
        assert!(flights.is_empty());
    }
}
