//! `compress()` / `decompress()` for NearCache's `COMPRESS` (the frames of `crate::compress`).
//!
//! Both take `bytes` only (immutable, kept alive by the caller), so that for inputs or outputs of
//! at least [`DETACH_MIN`] bytes the work runs without the GIL: other threads run Python
//! meanwhile. Below that, releasing and taking back the GIL would cost more than it frees.
//! Every failure, a panic included, is a `ValueError` (never a panic crossing into Python).

use std::panic::{catch_unwind, AssertUnwindSafe};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::compress::{self as core, Codec};

/// Inputs (to compress) or outputs (of a decompression) from this size on run without the GIL.
pub const DETACH_MIN: usize = 64 * 1024;

fn guarded<T>(f: impl FnOnce() -> Result<T, core::Error>) -> Result<T, String> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err("the codec panicked".to_owned()),
    }
}

/// `data` compressed with `codec` (`"zstd"` or `"lz4"`), as a frame that names its codec.
#[pyfunction]
pub fn compress<'py>(py: Python<'py>, data: &[u8], codec: &str) -> PyResult<Bound<'py, PyBytes>> {
    let codec = Codec::from_name(codec).ok_or_else(|| {
        PyValueError::new_err(format!("unknown codec {codec:?}: 'zstd' or 'lz4'"))
    })?;
    let frame = if data.len() >= DETACH_MIN {
        py.detach(|| guarded(|| core::compress(codec, data)))
    } else {
        guarded(|| core::compress(codec, data))
    }
    .map_err(PyValueError::new_err)?;
    Ok(PyBytes::new(py, &frame))
}

/// The content of `frame`; `ValueError` if it is not a frame, is malformed, or declares (or
/// would inflate to) more than `max_size` bytes. Nothing larger than `max_size` is allocated.
#[pyfunction]
pub fn decompress<'py>(
    py: Python<'py>,
    frame: &[u8],
    max_size: usize,
) -> PyResult<Bound<'py, PyBytes>> {
    let n = guarded(|| core::declared_size(frame, max_size)).map_err(PyValueError::new_err)?;
    // The bytes object is filled in place: it is ours alone until returned, so writing it
    // without the GIL is safe.
    PyBytes::new_with(py, n, |out| {
        if n >= DETACH_MIN {
            py.detach(|| guarded(|| core::decompress_into(frame, out)))
        } else {
            guarded(|| core::decompress_into(frame, out))
        }
        .map_err(PyValueError::new_err)
    })
}
