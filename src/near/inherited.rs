//! Descriptors of listener connections, closed in a forked child at once.
//!
//! A child inherits a copy of every descriptor, but not the listener thread that reads it. A copy
//! left open keeps the connection alive after the parent closes its own (a reconnect, `close()`,
//! the parent's exit): the server goes on pushing invalidations into a socket nobody reads, and a
//! normal client's output buffer has no limit by default, so the server's memory grows. The fork
//! handler's child half (`crate::fork`) therefore closes every registered descriptor before the
//! child runs anything else, when the numbers are still certainly ours.
//!
//! Lock-free (a fixed table of atomics), so the handler needs no lock a fork could have copied
//! held. A connection is registered after it is made and deregistered before it is closed, so
//! the child never closes a number the parent reused. A descriptor that finds no free slot (more
//! than `SLOTS` live at once) is simply not closed in a child: a leak, never a wrong close.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, Ordering::AcqRel};

const SLOTS: usize = 256;
const FREE: RawFd = -1;

static FDS: [AtomicI32; SLOTS] = [const { AtomicI32::new(FREE) }; SLOTS];

/// A descriptor registered for closing in a forked child; deregistered when dropped (drop it
/// before the descriptor itself is closed).
#[derive(Debug)]
pub struct Registered(Option<usize>);

/// Registers `fd` (`Registered(None)` when the table is full).
pub fn register(fd: RawFd) -> Registered {
    for (i, slot) in FDS.iter().enumerate() {
        if slot
            .compare_exchange(FREE, fd, AcqRel, std::sync::atomic::Ordering::Relaxed)
            .is_ok()
        {
            return Registered(Some(i));
        }
    }
    Registered(None)
}

impl Registered {
    /// Whether the descriptor will be closed in a forked child.
    pub fn is_registered(&self) -> bool {
        self.0.is_some()
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        if let Some(i) = self.0 {
            FDS[i].store(FREE, std::sync::atomic::Ordering::Release);
        }
    }
}

/// In a forked child (from the fork handler): closes every registered descriptor and frees its
/// slot. The parent's copies are untouched: this closes the child's descriptors only.
pub fn close_all_in_child() {
    for slot in &FDS {
        let fd = slot.swap(FREE, AcqRel);
        if fd >= 0 {
            // SAFETY: `fd` was registered by a live connection of the parent and not yet
            // deregistered, so in this child (which has run nothing since the fork) it is that
            // connection's copy; nothing here owns it any more (the thread that did is gone).
            unsafe { libc::close(fd) };
        }
    }
}

/// Registered descriptors (tests).
#[cfg(test)]
pub fn registered(fd: RawFd) -> bool {
    FDS.iter()
        .any(|s| s.load(std::sync::atomic::Ordering::Acquire) == fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_and_drop_free_the_slot() {
        let r = register(1_000_001);
        assert!(r.is_registered() && registered(1_000_001));
        drop(r);
        assert!(!registered(1_000_001));
    }
}
