//! A compact byte form of small plain values (exact `dict`, `list` and `tuple` of `str`, `bytes`,
//! 64-bit `int`, `float`, `bool` and `None`, nested), so that the entry's own block holds them like
//! a short pickle (`Kind::Pickled`) and `get` rebuilds the value from the bytes without pickle.
//!
//! Held as Python objects, a small dict costs its dict, its keys table and every value object
//! (~380 bytes an entry for a 4-item dict, more than LocMemCache's pickle); as these bytes it costs
//! a few bytes an item. Decoding builds the containers and atoms directly (no unpickler, no memo,
//! no opcode dispatch), which keeps `get` well below `pickle.loads` of the same value.
//!
//! The form starts with `MARK` (0xFF), which no pickle starts with (pickle has no opcode 0xFF), so
//! an inline payload is told from a pickle by its first byte. Values whose pickle keeps something
//! this form does not (a container or tuple met twice: pickle keeps the identity; subclasses; big
//! ints; `str` with lone surrogates; tuple keys) are refused (`encode` gives `None`) and stored as
//! before.

use std::ptr::addr_of_mut;

use pyo3::exceptions::PyValueError;
use pyo3::ffi;
use pyo3::prelude::*;

use super::plain::MAX_DEPTH;

/// The first byte of the compact form (never the first byte of a pickle).
pub const MARK: u8 = 0xFF;

const NONE: u8 = 0;
const FALSE: u8 = 1;
const TRUE: u8 = 2;
/// Followed by the zigzag varint of an `i64`.
const INT: u8 = 3;
/// Followed by the 8 bytes of an `f64` (little-endian bits: -0.0 and NaN payloads kept).
const FLOAT: u8 = 4;
/// Followed by the varint length and the UTF-8 bytes.
const STR: u8 = 5;
/// Followed by the varint length and the bytes.
const BYTES: u8 = 6;
/// Followed by the varint item count and the items.
const LIST: u8 = 7;
const TUPLE: u8 = 8;
/// Followed by the varint item count and the key, value pairs.
const DICT: u8 = 9;
/// `SHORT_STR | n`: a `str` of `n` < 128 UTF-8 bytes, which follow.
const SHORT_STR: u8 = 0x80;

/// Containers a value may hold (each is remembered to refuse one met twice).
const MAX_CONTAINERS: usize = 64;

/// The compact form of `v` if it is a plain value this form keeps exactly and its form takes at
/// most `max` bytes; `None` otherwise. Runs no Python code (type checks and C accessors only).
pub fn encode(v: &Bound<'_, PyAny>, max: usize) -> Option<Vec<u8>> {
    let mut e = Encoder {
        out: Vec::with_capacity(64),
        max,
        seen: Vec::new(),
    };
    e.out.push(MARK);
    // SAFETY: `v` is alive and the GIL held for the whole walk, during which no Python code runs.
    unsafe { e.value(v.as_ptr(), 0)? };
    (e.out.len() <= max).then_some(e.out)
}

struct Encoder {
    out: Vec<u8>,
    max: usize,
    /// Addresses of the containers met so far.
    seen: Vec<usize>,
}

impl Encoder {
    fn varint(&mut self, n: u64) {
        put_varint(&mut self.out, n);
    }

    /// `None` if `n` more bytes would take the form past `max` (checked before copying them: a
    /// big `str` inside a dict is not copied only to be refused).
    fn room(&self, n: usize) -> Option<()> {
        (self.out.len().saturating_add(n) <= self.max).then_some(())
    }

    /// Remembers the container `p`; `None` if it was met already or there are too many.
    fn meet(&mut self, p: *mut ffi::PyObject) -> Option<()> {
        let p = p as usize;
        (self.seen.len() < MAX_CONTAINERS && !self.seen.contains(&p)).then(|| self.seen.push(p))
    }

    /// # Safety
    /// `p` must be a live object, the GIL held.
    unsafe fn value(&mut self, p: *mut ffi::PyObject, depth: usize) -> Option<()> {
        if self.out.len() > self.max || depth > MAX_DEPTH {
            return None;
        }
        let t = ffi::Py_TYPE(p);
        if t == addr_of_mut!(ffi::PyUnicode_Type) {
            return self.str(p);
        }
        if t == addr_of_mut!(ffi::PyLong_Type) {
            return self.int(p);
        }
        if t == addr_of_mut!(ffi::PyFloat_Type) {
            self.out.push(FLOAT);
            let x = ffi::PyFloat_AsDouble(p);
            self.out.extend_from_slice(&x.to_bits().to_le_bytes());
            return Some(());
        }
        if p == ffi::Py_None() {
            self.out.push(NONE);
            return Some(());
        }
        if t == addr_of_mut!(ffi::PyBool_Type) {
            self.out
                .push(if p == ffi::Py_True() { TRUE } else { FALSE });
            return Some(());
        }
        if t == addr_of_mut!(ffi::PyBytes_Type) {
            let n = ffi::PyBytes_Size(p) as usize;
            self.room(n)?;
            let data = ffi::PyBytes_AsString(p).cast::<u8>();
            self.out.push(BYTES);
            self.varint(n as u64);
            self.out
                .extend_from_slice(std::slice::from_raw_parts(data, n));
            return Some(());
        }
        if t == addr_of_mut!(ffi::PyList_Type) || t == addr_of_mut!(ffi::PyTuple_Type) {
            self.meet(p)?;
            let list = t == addr_of_mut!(ffi::PyList_Type);
            let n = if list {
                ffi::PyList_Size(p)
            } else {
                ffi::PyTuple_Size(p)
            } as usize;
            self.out.push(if list { LIST } else { TUPLE });
            self.varint(n as u64);
            for i in 0..n {
                // Borrowed items of a container nothing can change meanwhile (no Python code
                // runs during the walk).
                let item = if list {
                    ffi::PyList_GetItem(p, i as _)
                } else {
                    ffi::PyTuple_GetItem(p, i as _)
                };
                if item.is_null() {
                    ffi::PyErr_Clear();
                    return None;
                }
                self.value(item, depth + 1)?;
            }
            return Some(());
        }
        if t == addr_of_mut!(ffi::PyDict_Type) {
            self.meet(p)?;
            let n = ffi::PyDict_Size(p) as usize;
            self.out.push(DICT);
            self.varint(n as u64);
            let mut pos: ffi::Py_ssize_t = 0;
            let mut k: *mut ffi::PyObject = std::ptr::null_mut();
            let mut v: *mut ffi::PyObject = std::ptr::null_mut();
            let mut items = 0;
            while ffi::PyDict_Next(p, &mut pos, &mut k, &mut v) != 0 {
                // Keys: scalars only (a tuple key would need the tuple's own hash rules).
                let kt = ffi::Py_TYPE(k);
                if kt == addr_of_mut!(ffi::PyTuple_Type) {
                    return None;
                }
                self.value(k, depth + 1)?;
                self.value(v, depth + 1)?;
                items += 1;
            }
            return (items == n).then_some(());
        }
        None
    }

    unsafe fn str(&mut self, p: *mut ffi::PyObject) -> Option<()> {
        let mut n: ffi::Py_ssize_t = 0;
        let data = ffi::PyUnicode_AsUTF8AndSize(p, &mut n);
        if data.is_null() {
            // Lone surrogates: no UTF-8 form.
            ffi::PyErr_Clear();
            return None;
        }
        let n = n as usize;
        self.room(n)?;
        if n < 128 {
            self.out.push(SHORT_STR | n as u8);
        } else {
            self.out.push(STR);
            self.varint(n as u64);
        }
        self.out
            .extend_from_slice(std::slice::from_raw_parts(data.cast::<u8>(), n));
        Some(())
    }

    unsafe fn int(&mut self, p: *mut ffi::PyObject) -> Option<()> {
        let mut overflow = 0;
        let i = ffi::PyLong_AsLongLongAndOverflow(p, &mut overflow);
        if overflow != 0 || (i == -1 && !ffi::PyErr_Occurred().is_null()) {
            ffi::PyErr_Clear();
            return None;
        }
        self.out.push(INT);
        self.varint(zigzag(i));
        Some(())
    }
}

/// An `i64` as an unsigned number that is small when the `i64` is near zero.
fn zigzag(i: i64) -> u64 {
    ((i << 1) ^ (i >> 63)) as u64
}

fn unzigzag(z: u64) -> i64 {
    ((z >> 1) as i64) ^ -((z & 1) as i64)
}

/// `n` in 7-bit groups, lowest first, the high bit set on all but the last.
fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// The varint at the start of `data` and its length; `None` if it is cut short or longer than
/// a `u64` can need (10 bytes).
fn read_varint(data: &[u8]) -> Option<(u64, usize)> {
    let mut n = 0u64;
    for (i, &b) in data.iter().take(10).enumerate() {
        n |= u64::from(b & 0x7F) << (7 * i);
        if b < 0x80 {
            return Some((n, i + 1));
        }
    }
    None
}

/// The value whose compact form is `data` (starting with `MARK`): new containers and atoms.
/// Malformed data (never made by `encode`) is a `ValueError`, not a panic.
pub fn decode<'py>(py: Python<'py>, data: &[u8]) -> PyResult<Bound<'py, PyAny>> {
    if data.first() != Some(&MARK) {
        return Err(malformed());
    }
    let mut r = Reader { data, pos: 1 };
    let v = r.value(py, 0)?;
    if r.pos != data.len() {
        return Err(malformed());
    }
    Ok(v)
}

fn malformed() -> PyErr {
    PyValueError::new_err("malformed compact value")
}

/// Longest key (UTF-8 bytes) the key cache keeps, and its slots (direct-mapped by hash).
const KEY_MAX: usize = 22;
const KEY_SLOTS: usize = 256;

/// A cached key: its UTF-8 bytes and the `str` made from them.
struct KeySlot {
    len: u8,
    bytes: [u8; KEY_MAX],
    key: Option<Py<PyAny>>,
}

thread_local! {
    /// Per thread, so that no lock is taken; the objects it holds are immutable `str`s, shared
    /// by the values it builds like any atom. A thread's cache goes with the thread (the
    /// references are then released the next time a thread holds the GIL).
    static KEYS: std::cell::RefCell<Vec<KeySlot>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The `str` of the UTF-8 bytes `s` (at most `KEY_MAX` long), from the key cache when it has it.
fn cached_key<'py>(py: Python<'py>, s: &[u8]) -> PyResult<Bound<'py, PyAny>> {
    let mut h: u32 = 0x811c_9dc5;
    for &b in s {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    let i = (h ^ (h >> 16)) as usize % KEY_SLOTS;
    // (`try_with`: while the thread's locals are being destroyed, no cache, no panic.)
    let hit = KEYS
        .try_with(|keys| {
            let keys = keys.try_borrow().ok()?;
            let slot = keys.get(i)?;
            (usize::from(slot.len) == s.len() && &slot.bytes[..s.len()] == s)
                .then(|| slot.key.as_ref().map(|k| k.bind(py).clone()))
                .flatten()
        })
        .ok()
        .flatten();
    if let Some(k) = hit {
        return Ok(k);
    }
    // SAFETY: `s` is valid for its length; the new reference is owned.
    let k = unsafe {
        Bound::from_owned_ptr_or_err(
            py,
            ffi::PyUnicode_FromStringAndSize(s.as_ptr().cast(), s.len() as _),
        )?
    };
    let mut bytes = [0; KEY_MAX];
    bytes[..s.len()].copy_from_slice(s);
    let slot = KeySlot {
        len: s.len() as u8,
        bytes,
        key: Some(k.clone().unbind()),
    };
    // The slot's old key is dropped after the borrow ends (dropping a reference runs no code
    // here: the cache's strs are exact `str`s, but keep the drop outside the borrow anyway).
    let old = KEYS.try_with(|keys| {
        let mut keys = keys.try_borrow_mut().ok()?;
        if keys.is_empty() {
            keys.resize_with(KEY_SLOTS, || KeySlot {
                len: 0,
                bytes: [0; KEY_MAX],
                key: None,
            });
        }
        Some(std::mem::replace(&mut keys[i], slot))
    });
    drop(old);
    Ok(k)
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    /// A dict's key: a short `str` comes from this thread's key cache (dict keys repeat from
    /// value to value: reusing the object saves making it and hashing it again).
    fn key<'py>(&mut self, py: Python<'py>, depth: usize) -> PyResult<Bound<'py, PyAny>> {
        match self.data.get(self.pos) {
            Some(&t) if t & SHORT_STR != 0 && usize::from(t & !SHORT_STR) <= KEY_MAX => {
                self.pos += 1;
                let s = self.take(usize::from(t & !SHORT_STR))?;
                cached_key(py, s)
            }
            _ => self.value(py, depth),
        }
    }

    fn byte(&mut self) -> PyResult<u8> {
        let b = *self.data.get(self.pos).ok_or_else(malformed)?;
        self.pos += 1;
        Ok(b)
    }

    fn take(&mut self, n: usize) -> PyResult<&[u8]> {
        let end = self.pos.checked_add(n).ok_or_else(malformed)?;
        let s = self.data.get(self.pos..end).ok_or_else(malformed)?;
        self.pos = end;
        Ok(s)
    }

    fn varint(&mut self) -> PyResult<u64> {
        let (n, len) = read_varint(&self.data[self.pos..]).ok_or_else(malformed)?;
        self.pos += len;
        Ok(n)
    }

    /// A count of items that the rest of the data can hold (each takes a byte at least).
    fn count(&mut self) -> PyResult<usize> {
        let n = self.varint()?;
        if n > (self.data.len() - self.pos) as u64 {
            return Err(malformed());
        }
        Ok(n as usize)
    }

    fn value<'py>(&mut self, py: Python<'py>, depth: usize) -> PyResult<Bound<'py, PyAny>> {
        if depth > MAX_DEPTH {
            return Err(malformed());
        }
        let tag = self.byte()?;
        // SAFETY: every call below makes a new object from plain data (or fails with an error
        // set); the owned references are wrapped at once.
        unsafe {
            let raw = match tag {
                NONE => return Ok(py.None().into_bound(py)),
                FALSE | TRUE => {
                    let b = if tag == TRUE {
                        ffi::Py_True()
                    } else {
                        ffi::Py_False()
                    };
                    return Ok(Bound::from_borrowed_ptr(py, b));
                }
                INT => ffi::PyLong_FromLongLong(unzigzag(self.varint()?)),
                FLOAT => {
                    let b: [u8; 8] = self.take(8)?.try_into().map_err(|_| malformed())?;
                    ffi::PyFloat_FromDouble(f64::from_bits(u64::from_le_bytes(b)))
                }
                BYTES => {
                    let n = self.varint()? as usize;
                    let s = self.take(n)?;
                    ffi::PyBytes_FromStringAndSize(s.as_ptr().cast(), s.len() as _)
                }
                STR => {
                    let n = self.varint()? as usize;
                    let s = self.take(n)?;
                    ffi::PyUnicode_FromStringAndSize(s.as_ptr().cast(), s.len() as _)
                }
                t if t & SHORT_STR != 0 => {
                    let s = self.take(usize::from(t & !SHORT_STR))?;
                    ffi::PyUnicode_FromStringAndSize(s.as_ptr().cast(), s.len() as _)
                }
                LIST | TUPLE => {
                    let n = self.count()?;
                    let list = tag == LIST;
                    let c = Bound::from_owned_ptr_or_err(
                        py,
                        if list {
                            ffi::PyList_New(n as _)
                        } else {
                            ffi::PyTuple_New(n as _)
                        },
                    )?;
                    for i in 0..n {
                        // Steals the item's reference into the new container's slot.
                        let item = self.value(py, depth + 1)?.into_ptr();
                        let failed = if list {
                            ffi::PyList_SetItem(c.as_ptr(), i as _, item)
                        } else {
                            ffi::PyTuple_SetItem(c.as_ptr(), i as _, item)
                        };
                        if failed != 0 {
                            return Err(PyErr::fetch(py));
                        }
                    }
                    return Ok(c);
                }
                DICT => {
                    let n = self.count()?;
                    let d = Bound::from_owned_ptr_or_err(py, ffi::PyDict_New())?;
                    for _ in 0..n {
                        let k = self.key(py, depth + 1)?;
                        let v = self.value(py, depth + 1)?;
                        // Exact scalar keys: hashing and comparing them runs no Python code.
                        if ffi::PyDict_SetItem(d.as_ptr(), k.as_ptr(), v.as_ptr()) != 0 {
                            return Err(PyErr::fetch(py));
                        }
                    }
                    return Ok(d);
                }
                _ => return Err(malformed()),
            };
            Bound::from_owned_ptr_or_err(py, raw)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ints_and_lengths_round_trip_through_zigzag_varints() {
        for i in [
            0,
            1,
            -1,
            63,
            -64,
            64,
            300,
            -300,
            i64::MAX,
            i64::MIN,
            i64::MIN + 1,
        ] {
            let mut out = Vec::new();
            put_varint(&mut out, zigzag(i));
            assert_eq!(read_varint(&out), Some((zigzag(i), out.len())));
            assert_eq!(unzigzag(zigzag(i)), i);
            assert!(out.len() <= 10);
        }
        // Small magnitudes take one byte, whatever the sign.
        assert!(zigzag(-64) < 0x80 && zigzag(63) < 0x80);
        let mut out = Vec::new();
        put_varint(&mut out, u64::MAX);
        assert_eq!(out.len(), 10);
        assert_eq!(read_varint(&out), Some((u64::MAX, 10)));
    }

    #[test]
    fn cut_or_overlong_varints_are_refused() {
        assert_eq!(read_varint(&[]), None);
        assert_eq!(read_varint(&[0x80, 0x80]), None);
        assert_eq!(read_varint(&[0xFF; 11]), None);
        assert_eq!(read_varint(&[0x05, 0xFF]), Some((5, 1)));
    }
}
