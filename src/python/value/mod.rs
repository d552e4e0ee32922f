//! How Python values are held in the store.
//!
//! Exact `str`, `bytes`, `float`, `bool`, `None`, big `int` and tuples of those cannot be mutated,
//! so the store keeps the object itself and hands it back as is. Exact `int` that fits in 64 bits
//! is kept as a Rust integer so that `incr` runs without Python. Plain containers (exact `dict`,
//! `list` and `tuple` of such atoms, nested) are held in a structural form (see `plain.rs`) that
//! `get` copies without pickle. Everything else is pickled (highest protocol), so that every `get`
//! returns an isolated copy, as Django's LocMemCache does.
//!
//! A small exact dict or list of such values (its compact form, `compact.rs`, at most
//! `INLINE_MAX` bytes) is not kept as objects at all: its compact bytes are the entry's payload,
//! as for a short pickle (tag `Pickled`; the form's first byte tells it from a pickle), and `get`
//! rebuilds it from them.
//!
//! Small `bytes`, `str` and pickles (`INLINE_MIN` to `INLINE_MAX` bytes) are not kept as objects:
//! their bytes (UTF-8 for a `str`) go into the entry's own block (`entry.rs`), one heap block
//! for header, key and value, and `get` builds a new object from them. Such an entry keeps no
//! `PyValue` at all: its kind is a tag in the header (`Pack::tag`). That saves the object, its
//! header and the value's 16 bytes an entry; larger values stay objects, so a big `get` stays a
//! reference.
//!
//! The structural form is recursive, so its parts are this module's children: `plain.rs` (the
//! walk, its buffer of words and their copy), `instance.rs` (plain class instances, whose words
//! the buffer holds and whose state follows them) and `sizes.rs` (what a Python object costs in
//! memory); `compact.rs` is the byte form of small ones.

mod compact;
pub(super) mod instance;
mod plain;
mod sizes;

use std::sync::Arc;

use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyDict, PyString};

use self::plain::{Flat, Plain};
use crate::entry::Pack;
use crate::store::Weigh;

/// The stored forms, 16 bytes each: a weight is kept in 32 bits (`weight32`); a value weighing
/// 4 GiB or more saturates it and the store refuses it as too large (see `shard::MAX_WEIGHT`).
pub enum PyValue {
    Pickled(Py<PyBytes>, u32),
    /// An immutable object returned as is (never GC-tracked: see `plain::atom`).
    Shared(Py<PyAny>, u32),
    Int(i64),
    /// The store's own copy of a dict of scalars, untracked by the GC; `get` returns `PyDict_Copy`.
    Dict(Py<PyDict>, u32),
    /// Any other plain value, rebuilt on each `get`.
    Tree(Arc<Flat>, u32),
    /// A small value on its way into the store: the object whose bytes become the payload.
    Pending(Py<PyAny>, Kind),
    /// A small value whose bytes the entry's block holds (its payload). Entries keep it as a
    /// tag (see `Pack`), not as a `PyValue`.
    Inline(Kind),
}

/// The values inline tags stand for (`Pack::from_tag`), indexed by tag - 1.
static INLINE: [PyValue; 3] = [
    PyValue::Inline(Kind::Bytes),
    PyValue::Inline(Kind::Str),
    PyValue::Inline(Kind::Pickled),
];

/// What the payload of an inline value is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Bytes,
    /// The UTF-8 form of a `str`.
    Str,
    /// A pickle, loaded on `get`, or a compact form (`compact.rs`: it starts with
    /// `compact::MARK`, which no pickle does), rebuilt on `get`.
    Pickled,
}

/// `bytes` and `str` of `INLINE_MIN` to `INLINE_MAX` bytes (UTF-8 for a `str`), and pickles of
/// up to `INLINE_MAX`, are kept inline. Shorter `bytes` and `str` stay objects: building one on
/// each `get` (~18 ns) would cost a short-string `get` a sixth of its time, where a pickle's
/// `get` (~0.5 us of unpickling) hardly notices.
pub const INLINE_MIN: usize = 32;
pub const INLINE_MAX: usize = 512;

/// A value's weight in 32 bits, `u32::MAX` standing for "4 GiB or more".
fn weight32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl Kind {
    /// The entry's tag for an inline value of this kind (1 to 3).
    fn tag(self) -> u8 {
        match self {
            Kind::Bytes => 1,
            Kind::Str => 2,
            Kind::Pickled => 3,
        }
    }
}

impl Weigh for PyValue {
    fn weight(&self) -> usize {
        let w = match self {
            PyValue::Pickled(_, n)
            | PyValue::Shared(_, n)
            | PyValue::Dict(_, n)
            | PyValue::Tree(_, n) => *n,
            // An inline value is charged through its payload's share of the entry's block.
            PyValue::Int(_) | PyValue::Pending(..) | PyValue::Inline(_) => 0,
        };
        if w == u32::MAX {
            usize::MAX
        } else {
            w as usize
        }
    }
}

impl Pack for PyValue {
    fn payload(&self) -> &[u8] {
        match self {
            // SAFETY: `o` is a `bytes` or a `str` whose UTF-8 form `encode` already made (so
            // this neither allocates nor fails), and the store asks for the payload in `set`,
            // on the calling thread, which holds the GIL; the bytes live as long as `o`.
            PyValue::Pending(o, kind) => unsafe {
                let p = o.as_ptr();
                let (data, len) = if *kind == Kind::Str {
                    let mut n: ffi::Py_ssize_t = 0;
                    let data = ffi::PyUnicode_AsUTF8AndSize(p, &mut n);
                    (data.cast::<u8>(), n as usize)
                } else {
                    (
                        ffi::PyBytes_AsString(p).cast::<u8>().cast_const(),
                        ffi::PyBytes_Size(p) as usize,
                    )
                };
                if data.is_null() {
                    &[]
                } else {
                    std::slice::from_raw_parts(data, len)
                }
            },
            _ => &[],
        }
    }

    fn tag(&self) -> u8 {
        match self {
            PyValue::Pending(_, kind) | PyValue::Inline(kind) => kind.tag(),
            _ => 0,
        }
    }

    fn without_payload(self) -> Self {
        match self {
            PyValue::Pending(_, kind) => PyValue::Inline(kind),
            other => other,
        }
    }

    fn from_tag(tag: u8) -> &'static Self {
        &INLINE[usize::from(tag.clamp(1, 3)) - 1]
    }
}

impl PyValue {
    /// A new reference to the same stored form, for an inline value a new object made from
    /// `payload` (the entry's). No Python code runs (allocating a `bytes` or `str` runs none and
    /// cannot start the garbage collector): safe under a shard lock.
    pub fn clone_ref(&self, py: Python<'_>, payload: &[u8]) -> PyResult<PyValue> {
        Ok(match self {
            PyValue::Inline(Kind::Bytes) => PyValue::Shared(bytes(py, payload)?.unbind(), 0),
            PyValue::Inline(Kind::Pickled) => PyValue::Pickled(
                bytes(py, payload)?
                    .cast_into::<PyBytes>()
                    .map_err(PyErr::from)?
                    .unbind(),
                0,
            ),
            PyValue::Inline(Kind::Str) => {
                // SAFETY: the payload is the UTF-8 form CPython gave for the stored `str`.
                let raw = unsafe {
                    ffi::PyUnicode_FromStringAndSize(payload.as_ptr().cast(), payload.len() as _)
                };
                PyValue::Shared(
                    unsafe { Bound::from_owned_ptr_or_err(py, raw)? }.unbind(),
                    0,
                )
            }
            PyValue::Pending(o, k) => PyValue::Pending(o.clone_ref(py), *k),
            PyValue::Pickled(b, n) => PyValue::Pickled(b.clone_ref(py), *n),
            PyValue::Shared(o, n) => PyValue::Shared(o.clone_ref(py), *n),
            PyValue::Int(i) => PyValue::Int(*i),
            PyValue::Dict(d, n) => PyValue::Dict(d.clone_ref(py), *n),
            PyValue::Tree(t, n) => PyValue::Tree(Arc::clone(t), *n),
        })
    }
}

/// A new `bytes` object holding `data` (a Python error, not a panic, if memory runs out).
fn bytes<'py>(py: Python<'py>, data: &[u8]) -> PyResult<Bound<'py, PyAny>> {
    // SAFETY: `data` is valid for its length; the new reference is owned.
    unsafe {
        let raw = ffi::PyBytes_FromStringAndSize(data.as_ptr().cast(), data.len() as _);
        Bound::from_owned_ptr_or_err(py, raw)
    }
}

struct Pickle {
    dumps: Py<PyAny>,
    loads: Py<PyAny>,
    protocol: i32,
}

fn pickle(py: Python<'_>) -> PyResult<&Pickle> {
    static PICKLE: PyOnceLock<Pickle> = PyOnceLock::new();
    PICKLE.get_or_try_init(py, || {
        let m = py.import("pickle")?;
        Ok(Pickle {
            dumps: m.getattr("dumps")?.unbind(),
            loads: m.getattr("loads")?.unbind(),
            protocol: m.getattr("HIGHEST_PROTOCOL")?.extract()?,
        })
    })
}

/// Turns a Python value into its stored form. Runs Python (pickling): call it outside every lock.
pub fn encode(v: &Bound<'_, PyAny>) -> PyResult<PyValue> {
    encode_with(v, None)
}

/// As `encode`, but a value that would be pickled is stored as `pickled`, a pickle of it the
/// caller already made (NearCache: the bytes it sent to or read from Redis), instead of pickling
/// it again. Plain values keep their structural form: `pickled` is then unused.
pub fn encode_with(
    v: &Bound<'_, PyAny>,
    pickled: Option<&Bound<'_, PyBytes>>,
) -> PyResult<PyValue> {
    if let Some(form) = compact_form(v) {
        let py = v.py();
        return Ok(PyValue::Pending(bytes(py, &form)?.unbind(), Kind::Pickled));
    }
    match plain::classify(v) {
        Plain::Int(n) => Ok(PyValue::Int(n)),
        Plain::Atom(weight) => {
            let kind = if v.is_exact_instance_of::<PyBytes>() {
                Some((Kind::Bytes, v.cast::<PyBytes>()?.as_bytes().len()))
            } else if v.is_exact_instance_of::<PyString>() {
                // The UTF-8 form exists (classify made it) unless the str has lone surrogates.
                v.cast::<PyString>()?
                    .to_str()
                    .ok()
                    .map(|t| (Kind::Str, t.len()))
            } else {
                None
            };
            Ok(match kind {
                Some((kind, n)) if (INLINE_MIN..=INLINE_MAX).contains(&n) => {
                    PyValue::Pending(v.clone().unbind(), kind)
                }
                _ => PyValue::Shared(v.clone().unbind(), weight32(weight)),
            })
        }
        Plain::Dict(d, weight) => Ok(PyValue::Dict(d, weight32(weight))),
        Plain::Tree(flat, weight) => Ok(PyValue::Tree(Arc::new(flat), weight32(weight))),
        Plain::No => {
            let bytes = match pickled {
                Some(b) => b.clone(),
                None => {
                    let py = v.py();
                    let p = pickle(py)?;
                    let made = p.dumps.bind(py).call1((v, p.protocol))?;
                    made.cast_into::<PyBytes>().map_err(PyErr::from)?
                }
            };
            let n = bytes.as_bytes().len();
            if n <= INLINE_MAX {
                return Ok(PyValue::Pending(bytes.into_any().unbind(), Kind::Pickled));
            }
            Ok(PyValue::Pickled(
                bytes.unbind(),
                weight32(sizes::bytes_size(n)),
            ))
        }
    }
}

/// The compact form (`compact.rs`) of an exact dict or list that it keeps exactly in at most
/// `INLINE_MAX` bytes: such a value goes into the entry's block like a short pickle.
fn compact_form(v: &Bound<'_, PyAny>) -> Option<Vec<u8>> {
    let p = v.as_ptr();
    // SAFETY: reading a live object's type.
    let t = unsafe { ffi::Py_TYPE(p) };
    let container = t == std::ptr::addr_of_mut!(ffi::PyDict_Type)
        || t == std::ptr::addr_of_mut!(ffi::PyList_Type);
    if !container {
        return None;
    }
    compact::encode(v, INLINE_MAX)
}

/// The value of an inline payload of kind `Pickled` (held in the `bytes` object `b`): a compact
/// form (it starts with `compact::MARK`) is rebuilt directly, anything else is a pickle.
fn load(py: Python<'_>, b: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
    if let Ok(data) = b.cast::<PyBytes>() {
        let data = data.as_bytes();
        if data.first() == Some(&compact::MARK) {
            return Ok(compact::decode(py, data)?.unbind());
        }
    }
    Ok(pickle(py)?.loads.bind(py).call1((b,))?.unbind())
}

/// Turns a stored form back into a Python value: a fresh copy of every mutable container
/// (unpickling or rebuilding: call it outside every lock).
pub fn decode(py: Python<'_>, v: PyValue) -> PyResult<Py<PyAny>> {
    match v {
        PyValue::Shared(o, _) => Ok(o),
        PyValue::Int(i) => Ok(i.into_pyobject(py)?.into_any().unbind()),
        PyValue::Dict(d, _) => Ok(plain::copy_dict(d.bind(py))?.unbind()),
        PyValue::Tree(t, _) => Ok(plain::build(py, &t)?.unbind()),
        PyValue::Pickled(b, _) => load(py, b.bind(py).as_any()),
        PyValue::Pending(o, Kind::Pickled) => load(py, o.bind(py)),
        PyValue::Pending(o, _) => Ok(o),
        PyValue::Inline(_) => Err(pyo3::exceptions::PyRuntimeError::new_err(
            "an inline value is decoded through clone_ref with its payload",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_forms_are_two_words_and_inline_ones_a_tag() {
        assert_eq!(std::mem::size_of::<PyValue>(), 16);
        for kind in [Kind::Bytes, Kind::Str, Kind::Pickled] {
            let v = PyValue::Inline(kind);
            assert!(matches!(PyValue::from_tag(v.tag()), PyValue::Inline(k) if *k == kind));
        }
        assert_eq!(PyValue::Int(5).tag(), 0);
        assert_eq!(weight32(12), 12);
        assert_eq!(weight32(u32::MAX as usize - 1), u32::MAX - 1);
        assert_eq!(weight32(1 << 40), u32::MAX);
    }
}
