//! `Fill` for Python: the guard of one fill of a key (`crate::store::Fill`), from `Handle.fill`.
//!
//! `put` stores once, only if nothing cancelled the fill since it began (a removal, invalidation,
//! local write or flush of the key, a newer fill of it, an invalidation of its tags); leaving the
//! `with` block, `release()`, or the object's deallocation ends it otherwise: its single-flight
//! ends (waking the callers waiting for the key) and its placeholder goes. A fill inherited
//! across fork() is inert in the child.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use super::handle::Handle;
use super::value::{encode_with, PyValue};
use crate::clock;
use crate::store::{self, Put};

#[pyclass(module = "django_rustcache._core")]
pub struct Fill {
    /// None once put or released.
    inner: Option<store::Fill<PyValue>>,
    handle: Py<Handle>,
}

impl Fill {
    pub(super) fn new(inner: store::Fill<PyValue>, handle: Py<Handle>) -> Self {
        Fill {
            inner: Some(inner),
            handle,
        }
    }
}

#[pymethods]
impl Fill {
    /// Stores `value` under `key` (which must be the key the fill was begun for, given as the
    /// handle's `set` takes it: Django's key warnings come from here, as from `set`) for
    /// `timeout`: as `set`, or with `replace=False` as `add`. `delta` is how long computing it
    /// took (seconds), recorded for early refresh. True if stored; False if the fill was
    /// cancelled, already put or released, or (for `add`) the key is there. Ends the fill.
    /// `pickled`, a pickle of `value` the caller already has (NearCache: the bytes it sent to
    /// Redis), is stored instead of pickling `value` again when `value` is not plain.
    #[pyo3(signature = (key, value, timeout, version = None, delta = 0.0, replace = true, *, pickled = None))]
    #[allow(clippy::too_many_arguments)]
    fn put(
        &mut self,
        py: Python<'_>,
        key: &Bound<'_, PyAny>,
        value: &Bound<'_, PyAny>,
        timeout: &Bound<'_, PyAny>,
        version: Option<&Bound<'_, PyAny>>,
        delta: f64,
        replace: bool,
        pickled: Option<&Bound<'_, PyBytes>>,
    ) -> PyResult<bool> {
        let handle = self.handle.bind(py).borrow();
        let k = handle.made_key(key, version)?;
        let Some(fill) = self.inner.as_mut() else {
            return Ok(false);
        };
        if *k != *fill.key() {
            return Err(PyValueError::new_err(
                "a fill stores only under the key it was begun for",
            ));
        }
        let stored = encode_with(value, pickled)?;
        let now = clock::now();
        let expires = handle.expiry_for(timeout, now)?;
        // A non-finite or negative duration (a broken clock) records nothing: no early refresh.
        let nanos = if delta.is_finite() && delta > 0.0 {
            (delta * 1e9) as u64
        } else {
            0
        };
        let put = fill.put(stored, expires, nanos, !replace, handle.limits(), now);
        self.inner = None;
        Ok(put == Put::Stored)
    }

    /// Ends the fill without storing (idempotent).
    fn release(&mut self) {
        self.inner = None;
    }

    /// Whether this fill owns the key's single-flight (the callers waiting for the key wait for
    /// it), as opposed to a fill without one or a nested fill of a key this thread already leads.
    #[getter]
    fn leads(&self) -> bool {
        self.inner.as_ref().is_some_and(|f| f.leads())
    }

    /// Whether `put` may still store: not put or released, and begun in this process.
    #[getter]
    fn open(&self) -> bool {
        self.inner.as_ref().is_some_and(|f| f.is_open())
    }

    fn __enter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&mut self, _exc: &Bound<'_, pyo3::types::PyTuple>) -> bool {
        self.inner = None;
        false
    }
}
