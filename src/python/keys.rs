//! Building made keys the way Django's default key function does: `"%s:%s:%s" % (prefix, version, key)`,
//! and the store text of Python strs a Rust `str` cannot hold as they are (see `crate::keys`).

use std::borrow::Cow;

use pyo3::exceptions::PyUnicodeEncodeError;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyInt, PyString};

use crate::keys::{push_code_point, unescape_to_utf8, ESC};

/// Appends `%s` of `part` to `out`: str as is, exact int in decimal, anything else through `str()`.
/// UnicodeEncodeError (and nothing appended) when that text holds a lone surrogate.
pub fn push_part(out: &mut String, part: &Bound<'_, PyAny>) -> PyResult<()> {
    if let Ok(s) = part.cast_exact::<PyString>() {
        out.push_str(s.to_str()?);
    } else if let Ok(i) = part.cast_exact::<PyInt>() {
        match i.extract::<i64>() {
            Ok(n) => {
                use std::fmt::Write;
                let _ = write!(out, "{n}");
            }
            Err(_) => out.push_str(&part.str()?.to_cow()?),
        }
    } else {
        out.push_str(&part.str()?.to_cow()?);
    }
    Ok(())
}

/// `push_part` as store text: escaped when the text holds a lone surrogate or U+FFFF.
pub fn push_part_escaped(out: &mut String, part: &Bound<'_, PyAny>) -> PyResult<()> {
    let start = out.len();
    match push_part(out, part) {
        Ok(()) if !out[start..].contains(ESC) => Ok(()),
        Err(e) if !e.is_instance_of::<PyUnicodeEncodeError>(part.py()) => Err(e),
        _ => {
            out.truncate(start);
            let py = part.py();
            let text = PyString::new(py, "%s").rem((part,))?;
            out.push_str(&escape(text.cast::<PyString>()?)?);
            Ok(())
        }
    }
}

/// The store text of `s`: itself when it has no lone surrogate and no U+FFFF, else escaped.
pub fn store_text<'a>(s: &'a Bound<'_, PyString>) -> PyResult<Cow<'a, str>> {
    match s.to_str() {
        Ok(text) if !text.contains(ESC) => Ok(Cow::Borrowed(text)),
        _ => escape(s).map(Cow::Owned),
    }
}

/// The escaped store text of `s`, code point by code point (the slow path: a key with a lone
/// surrogate or U+FFFF).
pub fn escape(s: &Bound<'_, PyString>) -> PyResult<String> {
    let py = s.py();
    let raw = s.call_method1(
        intern!(py, "encode"),
        (intern!(py, "utf-32-le"), intern!(py, "surrogatepass")),
    )?;
    let bytes = raw.cast::<PyBytes>()?.as_bytes();
    let mut out = String::with_capacity(bytes.len() / 4 + 16);
    for cp in bytes.chunks_exact(4) {
        push_code_point(&mut out, u32::from_le_bytes([cp[0], cp[1], cp[2], cp[3]]));
    }
    Ok(out)
}

/// The Python str whose store text is `text` (lone surrogates and U+FFFF restored).
pub fn unescape<'py>(py: Python<'py>, text: &str) -> PyResult<Bound<'py, PyString>> {
    if !text.contains(ESC) {
        return Ok(PyString::new(py, text));
    }
    let utf8 = PyBytes::new(py, &unescape_to_utf8(text));
    Ok(utf8
        .call_method1(
            intern!(py, "decode"),
            (intern!(py, "utf-8"), intern!(py, "surrogatepass")),
        )?
        .cast_into::<PyString>()?)
}
