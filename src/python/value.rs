//! How Python values are held in the store.
//!
//! Exact `str`, `bytes`, `float`, `bool`, `None`, big `int` and tuples of those cannot be mutated,
//! so the store keeps the object itself and hands it back as is. Exact `int` that fits in 64 bits
//! is kept as a Rust integer so that `incr` runs without Python. Plain containers (exact `dict`,
//! `list` and `tuple` of such atoms, nested) are held in a structural form (see `plain.rs`) that
//! `get` copies without pickle. Everything else is pickled (highest protocol), so that every `get`
//! returns an isolated copy, as Django's LocMemCache does.

use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyDict};

use super::plain::{self, Node, Plain};
use super::sizes;
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
    Tree(Arc<Node>, u32),
}

/// A value's weight in 32 bits, `u32::MAX` standing for "4 GiB or more".
fn weight32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl Weigh for PyValue {
    fn weight(&self) -> usize {
        let w = match self {
            PyValue::Pickled(_, n)
            | PyValue::Shared(_, n)
            | PyValue::Dict(_, n)
            | PyValue::Tree(_, n) => *n,
            PyValue::Int(_) => 0,
        };
        if w == u32::MAX {
            usize::MAX
        } else {
            w as usize
        }
    }
}

impl PyValue {
    /// A new reference to the same stored form (no Python code runs: safe under a shard lock).
    pub fn clone_ref(&self, py: Python<'_>) -> PyValue {
        match self {
            PyValue::Pickled(b, n) => PyValue::Pickled(b.clone_ref(py), *n),
            PyValue::Shared(o, n) => PyValue::Shared(o.clone_ref(py), *n),
            PyValue::Int(i) => PyValue::Int(*i),
            PyValue::Dict(d, n) => PyValue::Dict(d.clone_ref(py), *n),
            PyValue::Tree(t, n) => PyValue::Tree(Arc::clone(t), *n),
        }
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
    match plain::classify(v) {
        Plain::Int(n) => Ok(PyValue::Int(n)),
        Plain::Atom(weight) => Ok(PyValue::Shared(v.clone().unbind(), weight32(weight))),
        Plain::Dict(d, weight) => Ok(PyValue::Dict(d, weight32(weight))),
        Plain::Tree(node, weight) => Ok(PyValue::Tree(Arc::new(node), weight32(weight))),
        Plain::No => {
            let py = v.py();
            let p = pickle(py)?;
            let pickled = p.dumps.bind(py).call1((v, p.protocol))?;
            let bytes = pickled.cast_into::<PyBytes>().map_err(PyErr::from)?;
            let n = bytes.as_bytes().len();
            Ok(PyValue::Pickled(
                bytes.unbind(),
                weight32(sizes::bytes_size(n)),
            ))
        }
    }
}

/// Turns a stored form back into a Python value: a fresh copy of every mutable container
/// (unpickling or rebuilding: call it outside every lock).
pub fn decode(py: Python<'_>, v: PyValue) -> PyResult<Py<PyAny>> {
    match v {
        PyValue::Shared(o, _) => Ok(o),
        PyValue::Int(i) => Ok(i.into_pyobject(py)?.into_any().unbind()),
        PyValue::Dict(d, _) => Ok(plain::copy_dict(d.bind(py))?.unbind()),
        PyValue::Tree(t, _) => Ok(plain::build(py, &t)?.unbind()),
        PyValue::Pickled(b, _) => Ok(pickle(py)?.loads.bind(py).call1((b,))?.unbind()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_forms_are_two_words() {
        assert_eq!(std::mem::size_of::<PyValue>(), 16);
        assert_eq!(crate::shard::slot_size::<PyValue>(), 96);
        assert_eq!(weight32(12), 12);
        assert_eq!(weight32(u32::MAX as usize - 1), u32::MAX - 1);
        assert_eq!(weight32(1 << 40), u32::MAX);
    }
}
