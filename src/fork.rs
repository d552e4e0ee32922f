//! fork(): what the child must not inherit as if it were alive.
//!
//! `install` registers `pthread_atfork` handlers once per process. They run around every fork of
//! the process, whoever forks (`os.fork`, `multiprocessing`, a C extension), in the forking thread:
//!
//! - *prepare* takes every lock of every store, so that no other thread is half-way through
//!   changing a table when the address space is copied;
//! - *parent* releases them;
//! - *child* releases them, forgets every in-flight record (`Flights`: their leaders are threads
//!   the child does not have, and would keep each follower waiting `STAMPEDE_WAIT`), and bumps
//!   `generation`, so per-process state kept elsewhere can tell it is in a new process (a
//!   `store::Fill` begun in the parent is inert in the child: it compares its generation).
//!
//! **Lock order** (prepare takes them in this order; every nesting in the code follows it):
//! 1. the store registry (`python/registry.rs`); then, store by store, in registry order:
//! 2. the store's flight table (`Flights::map`; never nested with another lock),
//! 3. its tag table (`TagTable::cells`), then each listed tag cell's `members`
//!    (`TagTable::reset` nests cells -> members),
//! 4. its shards, by index (`Store::register` nests members -> shard; `lock_all` goes by index);
//! 5. last, the instance-class table (`python/value/instance.rs`, `KNOWN`; never nested).
//!
//! **Why prepare cannot deadlock.** Prepare blocks until each lock is free. A lock held by another
//! thread is released without that thread waiting for anything else: store operations run with
//! the GIL held from start to end and never release it, nor run Python code, under a store lock
//! (values are dropped after unlocking; the only GIL release, a single-flight follower's wait in
//! `Handle::fill`, holds no store lock). So when the forking thread holds the GIL
//! (`os.fork`, `multiprocessing`), no store lock is held by anyone and prepare takes them at once;
//! when a C extension forks without the GIL, the holders finish and let go.
//!
//! **Threads without the GIL.** The NearCache listener thread applies invalidations to a store
//! without the GIL, so it may be waiting for a store lock that prepare holds. It does so inside a
//! `Quiet` section: prepare first waits until no section is open and holds new ones back until
//! the fork is done, so no thread is ever parked on a lock prepare holds (see `Quiet`).
//!
//! Not covered: a flight's own state lock and condvar (a follower may be inside its wait at the
//! fork; the child drops those flights unread), and `parking_lot`'s global queue of parked threads
//! (a thread parking at the very instant of the fork could leave one of its buckets locked in the
//! child). Both need another thread to be inside a wait at the fork.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Once;

static GENERATION: AtomicU64 = AtomicU64::new(0);

/// A fork is between its prepare and parent/child steps.
static FORKING: AtomicBool = AtomicBool::new(false);
/// Threads inside a `Quiet` section now.
static QUIET: AtomicUsize = AtomicUsize::new(0);

/// A section of a thread that takes store locks without the GIL (the NearCache listener applying
/// an invalidation or a flush). *prepare* waits until none is open and keeps new ones from
/// opening until the fork is done, so that no such thread is parked on a store lock that
/// *prepare* holds: a parked waiter sets the lock's "parked" bit, and releasing such a lock in
/// the child goes through `parking_lot`'s queue of parked threads, whose bucket locks a thread of
/// the parent may have held at the fork (the child hung there, in `unlock_after_fork`). Python
/// threads need no section: they take store locks only with the GIL, which the forking thread
/// holds (or, forking without the GIL, prepare just waits for them to let go, as before).
#[must_use = "the section ends when the guard is dropped"]
pub struct Quiet(());

/// Opens a `Quiet` section, first waiting out a fork under way (microseconds).
pub fn quiet() -> Quiet {
    loop {
        if !FORKING.load(Ordering::SeqCst) {
            QUIET.fetch_add(1, Ordering::SeqCst);
            if !FORKING.load(Ordering::SeqCst) {
                return Quiet(());
            }
            QUIET.fetch_sub(1, Ordering::SeqCst);
        }
        std::thread::yield_now();
    }
}

impl Drop for Quiet {
    fn drop(&mut self) {
        QUIET.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Incremented in the child after every fork() (pthread_atfork child handler, installed once).
pub fn generation() -> u64 {
    GENERATION.load(Ordering::Acquire)
}

/// Tests that fork, or call the handlers, take this: the handlers' state is process-wide.
#[cfg(test)]
pub(crate) fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Installs the atfork handlers (idempotent); called from the module init.
pub fn install() {
    static INSTALLED: Once = Once::new();
    INSTALLED.call_once(|| {
        // SAFETY: the handlers are `extern "C" fn()` with static lifetime; registering them has
        // no other precondition. A failure (ENOMEM) leaves fork unguarded, as before.
        unsafe {
            libc::pthread_atfork(Some(prepare), Some(parent), Some(child));
        }
    });
}

extern "C" fn prepare() {
    // A `Quiet` section never waits for this thread (it needs no GIL and no lock this thread
    // holds), so the wait ends once the open sections finish their one invalidation or flush.
    FORKING.store(true, Ordering::SeqCst);
    while QUIET.load(Ordering::SeqCst) != 0 {
        std::thread::yield_now();
    }
    #[cfg(feature = "python")]
    crate::python::lock_for_fork();
}

extern "C" fn parent() {
    // SAFETY: `prepare` took these locks in this very thread just before the fork.
    #[cfg(feature = "python")]
    unsafe {
        crate::python::unlock_after_fork(false)
    };
    FORKING.store(false, Ordering::SeqCst);
}

extern "C" fn child() {
    GENERATION.fetch_add(1, Ordering::AcqRel);
    crate::near::inherited::close_all_in_child();
    // SAFETY: the child's only thread is the one that ran `prepare`; it holds the locks.
    #[cfg(feature = "python")]
    unsafe {
        crate::python::unlock_after_fork(true)
    };
    // No thread of the parent exists here, so no section is open.
    QUIET.store(0, Ordering::SeqCst);
    FORKING.store(false, Ordering::SeqCst);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `prepare` waits for an open `Quiet` section, and no section opens until the fork is
    /// over (`parent`); run without the `python` feature, where prepare takes no store lock.
    #[cfg(not(feature = "python"))]
    #[test]
    fn prepare_waits_for_quiet_sections_and_holds_new_ones_back_until_the_fork_is_over() {
        use std::sync::atomic::AtomicBool;
        use std::sync::{mpsc, Arc};
        use std::thread;
        use std::time::Duration;

        let _serial = serial();
        let section = quiet();
        let prepared = Arc::new(AtomicBool::new(false));
        let p = prepared.clone();
        let forker = thread::spawn(move || {
            prepare();
            p.store(true, Ordering::SeqCst);
        });
        thread::sleep(Duration::from_millis(50));
        assert!(
            !prepared.load(Ordering::SeqCst),
            "prepare ran past an open section"
        );
        drop(section);
        forker.join().unwrap();
        assert!(prepared.load(Ordering::SeqCst));
        // Between prepare and parent, a new section waits.
        let (tx, rx) = mpsc::channel();
        let opener = thread::spawn(move || {
            let _s = quiet();
            tx.send(()).unwrap();
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(50)).is_err(),
            "opened during a fork"
        );
        parent();
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the section opens after the fork");
        opener.join().unwrap();
        assert_eq!(QUIET.load(Ordering::SeqCst), 0);
    }

    /// Forks (the test harness is multi-threaded: the child only reads an atomic and exits)
    /// and returns the child's exit status.
    fn in_child(check: fn() -> bool) -> i32 {
        let _serial = serial();
        // SAFETY: the child runs only `check` (no locks, no allocation) and `_exit`.
        unsafe {
            match libc::fork() {
                0 => libc::_exit(if check() { 0 } else { 1 }),
                -1 => panic!("fork failed"),
                pid => {
                    let mut status = 0;
                    assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
                    assert!(libc::WIFEXITED(status));
                    libc::WEXITSTATUS(status)
                }
            }
        }
    }

    /// A value weighing nothing.
    #[cfg(not(feature = "shuttle"))]
    struct Val;

    #[cfg(not(feature = "shuttle"))]
    impl crate::store::Weigh for Val {
        fn weight(&self) -> usize {
            0
        }
    }

    #[cfg(not(feature = "shuttle"))]
    impl crate::entry::Pack for Val {
        fn from_tag(_: u8) -> &'static Self {
            &Val
        }
    }

    #[cfg(not(feature = "shuttle"))]
    static STORE: std::sync::OnceLock<crate::store::Store<Val>> = std::sync::OnceLock::new();

    #[cfg(not(feature = "shuttle"))]
    /// What the child must find: every lock free, no flight, a store that works.
    fn child_store_works() -> i32 {
        use crate::flight::Role;
        use crate::store::{Limits, Put};
        let store = STORE.get().unwrap();
        if store.is_locked() {
            return 2;
        }
        if !store.flights.is_empty() {
            return 3;
        }
        let stamps = store.tags.stamps(["t"]);
        let put = store.set(
            "k2",
            Val,
            crate::clock::NEVER,
            stamps,
            &Limits::default(),
            1,
        );
        if put != Put::Stored {
            return 4;
        }
        // "k1" (stored before the fork) and "k2" carry the tag.
        if store.invalidate_tags(["t"], 2) != 2 {
            return 5;
        }
        if !matches!(store.flights.begin("k", 2), Role::Leader) {
            return 6;
        }
        0
    }

    // Flights run on shuttle's primitives under that feature, which only work inside a shuttle run.
    #[cfg(not(feature = "shuttle"))]
    #[test]
    fn a_store_locked_for_fork_is_whole_in_both_processes_and_the_child_has_no_flights() {
        use crate::flight::Role;
        let store = STORE.get_or_init(|| crate::store::Store::new(4));
        let stamps = store.tags.stamps(["t"]);
        let lim = crate::store::Limits::default();
        store.set("k1", Val, crate::clock::NEVER, stamps, &lim, 1);
        // Another thread leads "k" and is still computing at the fork.
        let (tx, rx) = std::sync::mpsc::channel();
        let leader = std::thread::spawn(move || {
            assert!(matches!(
                STORE.get().unwrap().flights.begin("k", 1),
                Role::Leader
            ));
            rx.recv().unwrap();
            STORE.get().unwrap().flights.finish("k", 1);
        });
        while store.flights.is_empty() {
            std::thread::yield_now();
        }
        // What the handlers do, around a fork.
        let _serial = serial();
        store.lock_for_fork();
        assert!(store.is_locked());
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            unsafe {
                store.unlock_after_fork(true);
                libc::_exit(child_store_works());
            }
        }
        unsafe { store.unlock_after_fork(false) };
        assert!(!store.is_locked());
        let mut status = 0;
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status));
        assert_eq!(libc::WEXITSTATUS(status), 0, "the child's check failed");
        // The parent keeps its flight until its leader finishes.
        assert_eq!(store.flights.len(), 1);
        tx.send(()).unwrap();
        leader.join().unwrap();
        assert!(store.flights.is_empty());
    }

    static BEFORE: AtomicU64 = AtomicU64::new(0);

    #[test]
    fn the_child_sees_a_new_generation_and_the_parent_keeps_its_own() {
        install();
        install(); // idempotent: handlers registered twice would bump twice
        let before = generation();
        BEFORE.store(before, Ordering::SeqCst);
        assert_eq!(
            in_child(|| generation() == BEFORE.load(Ordering::SeqCst) + 1),
            0
        );
        assert_eq!(generation(), before);
    }
}
