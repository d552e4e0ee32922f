//! The PyO3 surface: `django_rustcache._core`. The Django-facing logic lives in Python; this is the
//! store behind it, plus key building and value encoding done without Python loops.

mod fast;
mod handle;
mod instance;
mod keys;
mod made_key;
mod near;
mod plain;
mod registry;
mod sizes;
mod value;

use pyo3::prelude::*;

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<handle::Handle>()?;
    m.add_class::<handle::TagSnapshot>()?;
    m.add_class::<fast::FastMethod>()?;
    m.add_class::<near::Near>()?;
    m.add_function(wrap_pyfunction!(near::near, m)?)?;
    crate::fork::install();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    instance::init(m.py());
    Ok(())
}
