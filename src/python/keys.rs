//! Building made keys the way Django's default key function does: `"%s:%s:%s" % (prefix, version, key)`.

use pyo3::prelude::*;
use pyo3::types::{PyInt, PyString};

/// Appends `%s` of `part` to `out`: str as is, exact int in decimal, anything else through `str()`.
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
