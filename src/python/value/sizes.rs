//! What CPython really allocates for the objects the store holds: `sys.getsizeof` semantics
//! (object header, items, GC header), rounded as the allocator rounds it. pymalloc serves
//! requests of up to 512 bytes in 16-byte steps; larger ones go to malloc (`mem::malloc_chunk`).
//!
//! An object the store keeps alive is charged its full size, even when something else holds it
//! too at `set` time: nobody can know whether those other holders outlive the entry, and charging
//! a share of a 10 MB string let 50 such entries hold 500 MB under a 0.5 MB charge (issue 10,
//! defect 6). Only objects CPython itself keeps alive for the life of the process (immortal ones,
//! small ints, one-character strings and bytes, interned strings) are charged their share of the
//! holders (see `cached`, `share`): that share is what the entry adds, and nearly nothing.

use std::sync::atomic::{AtomicU8, Ordering::Relaxed};

use pyo3::ffi;
use pyo3::prelude::*;

use crate::mem::malloc_chunk;

/// The block the allocator hands a Python object of `n` bytes.
#[inline]
pub const fn object_block(n: usize) -> usize {
    if n <= 512 {
        n.div_ceil(16) * 16
    } else {
        malloc_chunk(n)
    }
}

/// CPython's minor version (3.x), read once.
pub fn minor(py: Python<'_>) -> u8 {
    static MINOR: AtomicU8 = AtomicU8::new(0);
    match MINOR.load(Relaxed) {
        0 => {
            let m = py.version_info().minor;
            MINOR.store(m, Relaxed);
            m
        }
        m => m,
    }
}

/// A `bytes` object of `n` bytes: a 32-byte header, the bytes and a trailing NUL.
#[inline]
pub const fn bytes_size(n: usize) -> usize {
    object_block(33 + n)
}

/// An ASCII `str` of `n` characters: a 48-byte header up to 3.11, 40 from 3.12 (the `wstr`
/// fields went away), then the characters and a NUL.
#[inline]
pub fn ascii_size(py: Python<'_>, n: usize) -> usize {
    let header = if minor(py) >= 12 { 40 } else { 48 };
    object_block(header + n + 1)
}

/// A non-ASCII `str` of `chars` characters whose UTF-8 form (`utf8`, cached in the object once
/// asked for, as the store does) is given: a 72-byte header up to 3.11, 56 from 3.12, the
/// characters at 1, 2 or 4 bytes each (the widest one decides) and a NUL, plus the UTF-8 copy.
pub fn wide_size(py: Python<'_>, chars: usize, utf8: &[u8]) -> usize {
    let header = if minor(py) >= 12 { 56 } else { 72 };
    // The lead byte of the widest character: 0xC2-0xC3 up to U+00FF, 0xC4-0xEF up to U+FFFF.
    let top = utf8.iter().copied().max().unwrap_or(0);
    let kind = match top {
        0..=0xC3 => 1,
        0xC4..=0xEF => 2,
        _ => 4,
    };
    object_block(header + (chars + 1) * kind) + object_block(utf8.len() + 1)
}

/// The length of the `str` `p` if it is a compact ASCII one (nearly every `str`), read from the
/// object itself: a plain value's walk sizes every `str` it holds, and the two C API calls this
/// spares were a tenth of `set`'s time for a large value. `None` for any other `str`, and for
/// every `str` where `layout_known` found the layout other than expected.
///
/// `PyASCIIObject` is the object header (16 bytes), `length` (at 16), `hash` (24) and `state`
/// (32), a 32-bit word whose bits are `interned` (2), `kind` (3), `compact` (bit 5) and `ascii`
/// (bit 6) in every CPython from 3.10 to 3.14 that an abi3 wheel loads in (not the free-threaded
/// build), on the 64-bit little-endian machines the wheel is built for; `sizes::cached` reads
/// `interned` the same way.
///
/// # Safety
/// `p` must be an exact `str` and the GIL held.
#[inline]
pub unsafe fn ascii_len(py: Python<'_>, p: *mut ffi::PyObject) -> Option<usize> {
    if !layout_known(py) {
        return None;
    }
    read_ascii_len(p)
}

/// `ascii_len`'s read, unchecked.
///
/// # Safety
/// `p` must be an exact `str` of a CPython with the layout `ascii_len` describes.
#[inline]
unsafe fn read_ascii_len(p: *mut ffi::PyObject) -> Option<usize> {
    const COMPACT_ASCII: u32 = (1 << 5) | (1 << 6);
    let base = p.cast::<u8>();
    let state = base.add(32).cast::<u32>().read_unaligned();
    if state & COMPACT_ASCII != COMPACT_ASCII {
        return None;
    }
    usize::try_from(base.add(16).cast::<isize>().read_unaligned()).ok()
}

/// Whether this interpreter lays `str` out as `ascii_len` reads it: a version it describes, and
/// (checked once, against the C API) the right answers for an ASCII and a non-ASCII `str`.
fn layout_known(py: Python<'_>) -> bool {
    static KNOWN: AtomicU8 = AtomicU8::new(0); // 0: not checked yet, 1: known, 2: not
    match KNOWN.load(Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let ok = (10..=14).contains(&minor(py)) && check_layout(py);
            KNOWN.store(if ok { 1 } else { 2 }, Relaxed);
            ok
        }
    }
}

fn check_layout(py: Python<'_>) -> bool {
    let cases: [(&str, Option<usize>); 4] = [
        ("", Some(0)),
        ("abc", Some(3)),
        ("plain ascii text of some length, past one word", Some(46)),
        ("caf\u{e9}", None),
    ];
    cases.iter().all(|&(text, want)| {
        let s = pyo3::types::PyString::new(py, text);
        // SAFETY: `s` is a live exact `str`; the read is within its `PyASCIIObject` header
        // (every `str` has one); the GIL is held.
        let got = unsafe { read_ascii_len(s.as_ptr()) };
        got == want
            && match want {
                Some(n) => n == text.len(),
                None => true,
            }
    })
}

/// Any `str`, found through the C API (or read, for a compact ASCII one: `ascii_len`).
///
/// # Safety
/// `p` must be an exact `str` and the GIL held.
pub unsafe fn str_size(py: Python<'_>, p: *mut ffi::PyObject) -> usize {
    if let Some(n) = ascii_len(py, p) {
        return ascii_size(py, n);
    }
    let chars = ffi::PyUnicode_GetLength(p) as usize;
    let mut n: ffi::Py_ssize_t = 0;
    let data = ffi::PyUnicode_AsUTF8AndSize(p, &mut n);
    if data.is_null() {
        ffi::PyErr_Clear(); // lone surrogates: no UTF-8 form; 2 bytes a character at least
        let header = if minor(py) >= 12 { 56 } else { 72 };
        return object_block(header + (chars + 1) * 4);
    }
    let n = n as usize;
    if n == chars {
        ascii_size(py, n)
    } else {
        wide_size(py, chars, std::slice::from_raw_parts(data.cast::<u8>(), n))
    }
}

/// An `int` of `bits` significant bits: a 24-byte header and one 4-byte digit per 30 bits (at
/// least one).
#[inline]
pub const fn int_size(bits: usize) -> usize {
    let digits = if bits == 0 { 1 } else { bits.div_ceil(30) };
    object_block(24 + 4 * digits)
}

/// A `float`.
pub const FLOAT_SIZE: usize = 32;

/// A tuple of `len` items, with its GC header.
#[inline]
pub const fn tuple_size(len: usize) -> usize {
    object_block(16 + 24 + 8 * len)
}

/// A dict of `n` items built by inserting them one by one (or a literal, or its `PyDict_Copy`):
/// the object with its GC header (64 bytes), then a keys table that starts at 8 slots (5 usable)
/// and grows to the next power of two of 3 times its items whenever full. The table has a header
/// (40 bytes on 3.10, 32 after), an index per slot (1 byte up to 128 slots, then 2, then 4) and
/// an entry per usable slot: hash, key and value (24 bytes), or from 3.11 on only key and value
/// (16 bytes) when every key is a `str`.
pub fn dict_size(py: Python<'_>, n: usize, str_keys: bool) -> usize {
    const OBJECT: usize = 64;
    if n == 0 {
        return OBJECT;
    }
    let (mut size, mut usable) = (8usize, 5usize);
    while usable < n {
        size = (usable * 3).next_power_of_two();
        usable = size * 2 / 3;
    }
    let index = match size {
        0..=128 => 1,
        129..=32768 => 2,
        _ => 4,
    };
    let m = minor(py);
    let header = if m <= 10 { 40 } else { 32 };
    let entry = if str_keys && m >= 11 { 16 } else { 24 };
    OBJECT + object_block(header + size * index + usable * entry)
}

/// Whether CPython keeps `p` alive by itself, so that holding it costs an entry only its share:
/// an immortal object (3.12 on: `None`, `True`, small ints, interned strings, the empty tuple,
/// one-character strings and bytes), or on 3.10 and 3.11 an interned `str`, an `int` in
/// [-5, 256] or a `str` or `bytes` of at most one character (CPython caches those), all of which
/// live in CPython's own tables. `t` is `p`'s exact type.
///
/// An interned `str` is read from its `state.interned` bits: the first two bits of the 32-bit
/// word that follows the object header, length and hash (offset 32) in every CPython from 3.10
/// to 3.13 (the wheel is built for 64-bit little-endian machines only).
///
/// # Safety
/// `p` must be a live object of exact type `t` and the GIL held.
pub unsafe fn cached(p: *mut ffi::PyObject, t: *mut ffi::PyTypeObject) -> bool {
    use std::ptr::addr_of_mut;
    if ffi::Py_REFCNT(p) >= IMMORTAL_REFCNT {
        return true;
    }
    if t == addr_of_mut!(ffi::PyUnicode_Type) {
        let state = p.cast::<u8>().add(32).cast::<u32>().read_unaligned();
        if state & 3 != 0 {
            return true;
        }
        let py = Python::assume_attached();
        return ascii_len(py, p).unwrap_or_else(|| ffi::PyUnicode_GetLength(p) as usize) <= 1;
    }
    if t == addr_of_mut!(ffi::PyBytes_Type) {
        return ffi::PyBytes_Size(p) <= 1;
    }
    if t == addr_of_mut!(ffi::PyLong_Type) {
        let mut overflow = 0;
        let i = ffi::PyLong_AsLongLongAndOverflow(p, &mut overflow);
        if i == -1 && !ffi::PyErr_Occurred().is_null() {
            ffi::PyErr_Clear();
        }
        return overflow == 0 && (-5..=256).contains(&i);
    }
    t == addr_of_mut!(ffi::PyTuple_Type) && ffi::PyTuple_Size(p) == 0
}

/// Reference counts from here on mark an immortal object (3.12 on; no mortal object has them).
const IMMORTAL_REFCNT: isize = 1 << 31;

/// The share of `size` that one holder of `p` pays: all of it if `held` (the references the
/// caller itself holds on `p`) plus one is all there is, else `size` divided by the holders.
/// Immortal and cached objects have huge counts and cost nothing. Only for objects `cached` says
/// CPython keeps alive: for others a share is an under-charge once the other holders let go.
///
/// # Safety
/// `p` must be a live object and the GIL held.
#[inline]
pub unsafe fn share(p: *mut ffi::PyObject, held: isize, size: usize) -> usize {
    let holders = (ffi::Py_REFCNT(p) - held).max(1) as usize;
    // The same quotient, without a division where it is 0: an interned key or a small int has
    // thousands of holders, and a value holds many (a 64-bit division each was a fifth of
    // `Walk::keep`'s time in `set` of a large value).
    if holders > size {
        0
    } else {
        size / holders
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pymalloc_rounds_to_16_up_to_512() {
        assert_eq!(object_block(1), 16);
        assert_eq!(object_block(133), 144);
        assert_eq!(object_block(512), 512);
        assert_eq!(object_block(513), malloc_chunk(513));
        assert_eq!(bytes_size(100), 144);
        assert_eq!(int_size(1), 32);
        assert_eq!(int_size(62), 48);
        assert_eq!(tuple_size(1), 48);
    }
}
