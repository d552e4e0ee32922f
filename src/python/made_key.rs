//! `MadeKey`: a made key built in a per-thread buffer that is reused from call to call, so that
//! the hot operations allocate no `String` for it.

use std::cell::Cell;
use std::fmt;
use std::ops::Deref;

thread_local! {
    static BUFFER: Cell<String> = const { Cell::new(String::new()) };
}

/// A made key; its buffer goes back to the thread when dropped.
///
/// A call that runs while another holds the buffer (a warning callback that uses the cache) just
/// finds it empty and allocates its own, so nesting is safe.
pub struct MadeKey(String);

impl MadeKey {
    /// The thread's buffer, emptied, to build a key in.
    pub fn buffer() -> String {
        let mut s = BUFFER.with(Cell::take);
        s.clear();
        s
    }

    pub fn new(s: String) -> MadeKey {
        MadeKey(s)
    }
}

impl Drop for MadeKey {
    fn drop(&mut self) {
        let s = std::mem::take(&mut self.0);
        // Keep at most a few kilobytes per thread: a huge key should not pin its memory.
        if s.capacity() <= 4096 {
            // `try_with`: the thread may be shutting down and its locals gone.
            let _ = BUFFER.try_with(|b| b.set(s));
        }
    }
}

impl Deref for MadeKey {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for MadeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_buffer_is_reused_and_nesting_gets_a_fresh_one() {
        let mut s = MadeKey::buffer();
        s.push_str("prefix:1:key");
        let outer = MadeKey::new(s);
        let ptr = outer.as_ptr();
        // While `outer` holds the buffer, a nested key gets an empty one of its own.
        let inner = MadeKey::buffer();
        assert!(inner.is_empty() && inner.capacity() == 0);
        assert_eq!(&*outer, "prefix:1:key");
        drop(outer);
        let again = MadeKey::buffer();
        assert!(again.is_empty() && again.as_ptr() == ptr);
    }
}
