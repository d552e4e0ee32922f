//! A crate-wide fork generation, so every piece of Rust state can tell it is in a forked child.
//!
//! Minimal version (the `forkasync` branch owns the real one, with the shard-lock handlers): a
//! `pthread_atfork` child handler bumps the generation; state that records the generation it was
//! made in (a listener thread, a lease) knows it is dead in the child when they differ.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;

static GENERATION: AtomicU64 = AtomicU64::new(0);

/// Incremented in the child after every fork() (pthread_atfork child handler, installed once).
pub fn generation() -> u64 {
    GENERATION.load(Ordering::Acquire)
}

#[cfg(unix)]
extern "C" fn child() {
    GENERATION.fetch_add(1, Ordering::AcqRel);
}

#[cfg(unix)]
extern "C" {
    fn pthread_atfork(
        prepare: Option<extern "C" fn()>,
        parent: Option<extern "C" fn()>,
        child: Option<extern "C" fn()>,
    ) -> std::os::raw::c_int;
}

/// Installs the atfork handlers (idempotent); called from the module init.
pub fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        #[cfg(unix)]
        // SAFETY: registers a handler that only does an atomic increment (async-signal-safe).
        unsafe {
            pthread_atfork(None, None, Some(child));
        }
    });
}
