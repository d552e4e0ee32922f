//! The PyO3 surface: `django_rustcache._core`. The Django-facing logic lives in Python; this is the
//! store behind it, plus key building and value encoding done without Python loops.

mod compress;
mod fast;
mod fill;
mod handle;
mod keys;
mod made_key;
mod near;
mod registry;
mod value;

use pyo3::prelude::*;

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<handle::Handle>()?;
    m.add_class::<handle::TagSnapshot>()?;
    m.add_class::<fill::Fill>()?;
    m.add_class::<fast::FastMethod>()?;
    m.add_class::<near::Near>()?;
    m.add_function(wrap_pyfunction!(near::near, m)?)?;
    m.add_function(wrap_pyfunction!(near::sentinel_switches, m)?)?;
    m.add_function(wrap_pyfunction!(compress::compress, m)?)?;
    m.add_function(wrap_pyfunction!(compress::decompress, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(fork_generation, m)?)?;
    value::instance::init(m.py());
    crate::fork::install();
    Ok(())
}

/// How many fork()s lie between the process that loaded the module and this one (0 in the
/// process that loaded it): `crate::fork::generation`.
#[pyfunction]
fn fork_generation() -> u64 {
    crate::fork::generation()
}

/// fork's prepare step (see `crate::fork` for the order): every store's locks, then `KNOWN`'s.
pub(crate) fn lock_for_fork() {
    registry::lock_for_fork();
    value::instance::lock_for_fork();
}

/// fork's parent and child steps: releases what `lock_for_fork` took; in the `child`, first
/// forgets every store's in-flight records.
///
/// # Safety
/// The calling thread (or the thread of the parent that forked this child) ran `lock_for_fork`
/// and nothing has released those locks since.
pub(crate) unsafe fn unlock_after_fork(child: bool) {
    value::instance::unlock_after_fork();
    registry::unlock_after_fork(child);
}
