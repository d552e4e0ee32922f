//! django-rustcache's core: a sharded in-process cache store (this crate) and, with the `python`
//! feature, its PyO3 bindings as the module `django_rustcache._core`.

pub mod clock;
pub mod compress;
pub mod early;
pub mod entry;
pub mod flight;
pub mod fork;
pub mod ghost;
pub mod keys;
pub mod mem;
pub mod near;
pub mod policy;
pub mod s3fifo;
pub mod shard;
pub mod sketch;
pub mod stats;
pub mod store;
pub mod stored_key;
mod sync;
pub mod tags;
pub mod tinylfu;

#[cfg(feature = "python")]
mod python;

#[cfg(feature = "python")]
#[pyo3::pymodule]
fn _core(m: &pyo3::Bound<'_, pyo3::types::PyModule>) -> pyo3::PyResult<()> {
    python::register(m)
}
