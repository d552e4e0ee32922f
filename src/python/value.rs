//! How Python values are held in the store.
//!
//! Exact `str`, `bytes`, `float`, `bool`, `None` and big `int` cannot be mutated, so the store keeps
//! the object itself and hands it back as is. Exact `int` that fits in 64 bits is kept as a Rust
//! integer so that `incr` runs without Python. Everything else is pickled (highest protocol), so
//! that every `get` returns an isolated copy, as Django's LocMemCache does.

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBool, PyBytes, PyFloat, PyInt, PyString};

use crate::store::Weigh;

pub enum PyValue {
    Pickled(Py<PyBytes>, usize),
    Shared(Py<PyAny>, usize),
    Int(i64),
}

impl Weigh for PyValue {
    fn weight(&self) -> usize {
        match self {
            PyValue::Pickled(_, n) | PyValue::Shared(_, n) => *n,
            PyValue::Int(_) => 0,
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

/// Size charged for a Python object header (refcount, type, length).
const OBJ_HEADER: usize = 32;

/// Turns a Python value into its stored form. Runs Python (pickling): call it outside every lock.
pub fn encode(v: &Bound<'_, PyAny>) -> PyResult<PyValue> {
    let py = v.py();
    if let Ok(s) = v.cast_exact::<PyString>() {
        // Code points times the widest width CPython may use for them would overstate most
        // strings; UTF-8 length is what a shared engine would store, and is cached by CPython.
        let n = s.to_str().map(str::len).unwrap_or(0);
        return Ok(PyValue::Shared(v.clone().unbind(), n + OBJ_HEADER));
    }
    if let Ok(i) = v.cast_exact::<PyInt>() {
        if let Ok(n) = i.extract::<i64>() {
            return Ok(PyValue::Int(n));
        }
        return Ok(PyValue::Shared(v.clone().unbind(), OBJ_HEADER + 16));
    }
    if let Ok(b) = v.cast_exact::<PyBytes>() {
        let n = b.as_bytes().len();
        return Ok(PyValue::Shared(v.clone().unbind(), n + OBJ_HEADER));
    }
    if v.is_none() || v.is_exact_instance_of::<PyFloat>() || v.is_exact_instance_of::<PyBool>() {
        return Ok(PyValue::Shared(v.clone().unbind(), OBJ_HEADER));
    }
    let p = pickle(py)?;
    let pickled = p.dumps.bind(py).call1((v, p.protocol))?;
    let bytes = pickled.cast_into::<PyBytes>().map_err(PyErr::from)?;
    let n = bytes.as_bytes().len();
    Ok(PyValue::Pickled(bytes.unbind(), n + OBJ_HEADER))
}

/// Turns a stored form back into a Python value (unpickling: call it outside every lock).
pub fn decode(py: Python<'_>, v: PyValue) -> PyResult<Py<PyAny>> {
    match v {
        PyValue::Shared(o, _) => Ok(o),
        PyValue::Int(i) => Ok(i.into_pyobject(py)?.into_any().unbind()),
        PyValue::Pickled(b, _) => Ok(pickle(py)?.loads.bind(py).call1((b,))?.unbind()),
    }
}
