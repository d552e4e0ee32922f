//! `FastMethod`: lets a `RustCache` method be the handle's Rust method itself, with no Python
//! frame per call, while keeping every way Python code may replace it working.
//!
//! It is a non-data descriptor on the class wrapping the Python method. Looked up on an instance
//! whose `__dict__` holds a bound handle method under its slot name (the backend puts one there
//! only when that method's semantics are exactly the Python method's: default key function, not
//! raw mode), it returns that bound method; otherwise the Python method bound as usual. So an
//! instance attribute of the same name (a mock) still wins, patching the class attribute still
//! applies to every instance, a subclass overriding the method still overrides it, and looking it
//! up on the class gives the plain Python function.

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::PyString;
use pyo3::{ffi, intern};

#[pyclass(module = "django_rustcache._core", frozen)]
pub struct FastMethod {
    func: Py<PyAny>,
    slot: Py<PyString>,
}

#[pymethods]
impl FastMethod {
    #[new]
    fn new(func: Bound<'_, PyAny>, slot: &str) -> PyResult<Self> {
        if !func.is_callable() {
            return Err(PyTypeError::new_err("FastMethod wraps a function"));
        }
        Ok(FastMethod {
            slot: PyString::intern(func.py(), slot).unbind(),
            func: func.unbind(),
        })
    }

    fn __get__(
        &self,
        py: Python<'_>,
        obj: Option<Bound<'_, PyAny>>,
        owner: Option<Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let Some(obj) = obj.filter(|o| !o.is_none()) else {
            return Ok(self.func.clone_ref(py));
        };
        // SAFETY: GenericGetDict returns a new reference to the instance dict (or NULL with an
        // exception set, for an object without one); GetItemWithError a borrowed item, turned
        // into an owned reference before the dict reference is released.
        unsafe {
            let dict = ffi::PyObject_GenericGetDict(obj.as_ptr(), std::ptr::null_mut());
            if dict.is_null() {
                ffi::PyErr_Clear();
            } else {
                let dict = Bound::from_owned_ptr(py, dict);
                let fast = ffi::PyDict_GetItemWithError(dict.as_ptr(), self.slot.as_ptr());
                if !fast.is_null() {
                    return Ok(Bound::from_borrowed_ptr(py, fast).unbind());
                }
                if let Some(e) = PyErr::take(py) {
                    return Err(e);
                }
            }
        }
        Ok(self
            .func
            .bind(py)
            .call_method1(intern!(py, "__get__"), (obj, owner))?
            .unbind())
    }

    /// The wrapped Python function (what `functools.wraps`-style introspection looks for).
    #[getter]
    fn __wrapped__(&self, py: Python<'_>) -> Py<PyAny> {
        self.func.clone_ref(py)
    }

    #[getter]
    fn __doc__(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        Ok(self.func.bind(py).getattr(intern!(py, "__doc__"))?.unbind())
    }
}

/// A `timeout` argument that may be left out (the backend's default) or given (a number, None
/// for never, or Django's `DEFAULT_TIMEOUT`).
pub enum TimeoutArg<'py> {
    Default,
    Given(Bound<'py, PyAny>),
}

impl<'a, 'py> FromPyObject<'a, 'py> for TimeoutArg<'py> {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        Ok(TimeoutArg::Given(obj.to_owned()))
    }
}
