//! `Handle`: one backend instance's view of a store: its key prefix, default version, default
//! timeout and limits, and the cache operations, each building the made key in Rust.
//!
//! In raw mode (a custom `KEY_FUNCTION` or an overridden `validate_key`) Python makes and validates
//! the key and passes it in; `version` is then ignored.

use std::sync::{Arc, OnceLock};

use ahash::RandomState;
use hashbrown::hash_map::{Entry, HashMap};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pyo3::exceptions::{PyTypeError, PyUnicodeEncodeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyFloat, PyInt, PyList, PyString, PyTuple, PyType};
use pyo3::{PyTraverseError, PyVisit};

use super::fast::TimeoutArg;
use super::fill::Fill;
use super::keys::{push_part, push_part_escaped, store_text, unescape};
use super::made_key::MadeKey;
use super::near::{Near, NearHit, Probe};
use super::registry;
use super::value::{decode, encode, PyValue};
use crate::clock::{self, NEVER};
use crate::keys::{check, Check};
use crate::policy::Policy;
use crate::store::{Begun, Lead, Limits, Put, Replace, Store};
use crate::tags::TagStamp;

#[pyclass(module = "django_rustcache._core")]
pub struct Handle {
    store: Arc<Store<PyValue>>,
    /// LOCATION as store text (see `crate::keys`): the registry's name of the store.
    location: String,
    /// KEY_PREFIX and VERSION as store text (see `crate::keys`), and as given, for the slow path.
    prefix: String,
    version: String,
    prefix_obj: Option<Py<PyAny>>,
    version_obj: Option<Py<PyAny>>,
    raw: bool,
    default_timeout: Option<f64>,
    limits: Limits,
    sentinel: Py<PyAny>,
    warn: Py<PyAny>,
    /// Set by `near_attach`: what `near_get`/`near_peek` need to answer NearCache's reads.
    near_hit: Option<NearHit>,
}

/// Tag versions taken before computing a value: storing with it stores nothing if any of those
/// tags was invalidated in between (the value may have been computed from stale data).
#[pyclass(module = "django_rustcache._core", frozen)]
pub struct TagSnapshot {
    stamps: Vec<TagStamp>,
}

#[pymethods]
impl TagSnapshot {
    /// Whether none of the tags has been invalidated since the snapshot.
    fn is_current(&self) -> bool {
        crate::tags::all_current(&self.stamps)
    }

    fn __len__(&self) -> usize {
        self.stamps.len()
    }
}

/// Wall-clock seconds at the monotonic clock's epoch, fixed once so conversions are repeatable.
fn wall_epoch() -> f64 {
    static EPOCH: OnceLock<f64> = OnceLock::new();
    *EPOCH.get_or_init(|| {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        wall - clock::now() as f64 / 1e9
    })
}

/// A made key as the flight table's text: the store's text of it (see `crate::keys`).
fn flight_name<'a>(key: &'a Bound<'_, PyString>) -> PyResult<std::borrow::Cow<'a, str>> {
    store_text(key)
}

/// Seconds of a per-call timeout, accepted exactly as LocMemCache's `time.time() + timeout`:
/// int (bool included; OverflowError past a float's range) and float as they are; any other type
/// through Python's `float + timeout` (so `Fraction` works and `Decimal` or `str` raise TypeError),
/// after Django's own `timeout == 0` check (which lets `Decimal(0)` through as "expired").
fn timeout_seconds(timeout: &Bound<'_, PyAny>) -> PyResult<f64> {
    if let Ok(f) = timeout.cast::<PyFloat>() {
        return Ok(f.value());
    }
    if timeout.is_instance_of::<PyInt>() {
        return timeout.extract::<f64>();
    }
    let py = timeout.py();
    if timeout.eq(0)? {
        return Ok(-1.0);
    }
    let not_real = || {
        PyTypeError::new_err(format!(
            "timeout must be a real number or None, not {}",
            timeout
                .get_type()
                .name()
                .map_or_else(|_| "?".into(), |n| n.to_string())
        ))
    };
    match PyFloat::new(py, 0.0).add(timeout) {
        Ok(sum) => sum.extract::<f64>().map_err(|_| not_real()),
        Err(e) if e.is_instance_of::<PyTypeError>(py) => Err(not_real()),
        Err(e) => Err(e),
    }
}

fn not_found(key: &str) -> PyErr {
    PyValueError::new_err(format!("Key '{key}' not found"))
}

impl Handle {
    /// The made key for `key` (see the module docs for raw mode), warning as Django does.
    fn key(&self, key: &Bound<'_, PyAny>, version: Option<&Bound<'_, PyAny>>) -> PyResult<MadeKey> {
        if self.raw {
            return match key.cast::<PyString>() {
                Ok(s) => match store_text(s)? {
                    std::borrow::Cow::Borrowed(text) => {
                        let mut out = MadeKey::buffer();
                        out.push_str(text);
                        Ok(MadeKey::new(out))
                    }
                    std::borrow::Cow::Owned(text) => Ok(MadeKey::new(text)),
                },
                Err(_) => Err(PyTypeError::new_err(format!(
                    "the key function must return a str, not {}",
                    key.get_type().name()?
                ))),
            };
        }
        let mut out = MadeKey::buffer();
        out.push_str(&self.prefix);
        out.push(':');
        let built = match version {
            Some(v) if !v.is_none() => push_part(&mut out, v),
            _ => {
                out.push_str(&self.version);
                Ok(())
            }
        }
        .and_then(|()| {
            out.push(':');
            push_part(&mut out, key)
        });
        match built {
            Ok(()) => {
                let out = MadeKey::new(out);
                match check(&out) {
                    Check::Clean => Ok(out),
                    Check::Warn => {
                        self.warn.bind(key.py()).call1((&*out,))?;
                        Ok(out)
                    }
                    Check::Escape => self.escaped_key(key, version).map(MadeKey::new),
                }
            }
            Err(e) if e.is_instance_of::<PyUnicodeEncodeError>(key.py()) => {
                self.escaped_key(key, version).map(MadeKey::new)
            }
            Err(e) => Err(e),
        }
    }

    /// The made key as Python makes it (Django's default key function), with KEY_PREFIX and
    /// VERSION as given rather than as store text.
    fn python_made_key<'py>(
        &self,
        key: &Bound<'py, PyAny>,
        version: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyString>> {
        let py = key.py();
        let prefix = match &self.prefix_obj {
            Some(p) => p.bind(py).clone(),
            None => PyString::new(py, &self.prefix).into_any(),
        };
        let version = match (version, &self.version_obj) {
            (Some(v), _) if !v.is_none() => v.clone(),
            (_, Some(v)) => v.bind(py).clone(),
            (_, None) => PyString::new(py, &self.version).into_any(),
        };
        Ok(PyString::new(py, "%s:%s:%s")
            .rem((prefix, version, key))?
            .cast_into::<PyString>()?)
    }

    /// The store text of a made key that holds a lone surrogate or U+FFFF (the slow path): made
    /// and checked for Django's warning by Python as Django does, then escaped (`crate::keys`).
    fn escaped_key(
        &self,
        key: &Bound<'_, PyAny>,
        version: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<String> {
        let made = self.python_made_key(key, version)?;
        self.warn.bind(key.py()).call1((&made,))?;
        super::keys::escape(&made)
    }

    /// Django's "Key '<made key>' not found" error. A made key holding lone surrogates or U+FFFF
    /// is stored escaped (see `crate::keys`): name it as Python made it, as Django does.
    fn not_found(
        &self,
        key: &Bound<'_, PyAny>,
        version: Option<&Bound<'_, PyAny>>,
        k: &str,
    ) -> PyErr {
        if !k.contains('\u{ffff}') {
            return not_found(k);
        }
        let py = key.py();
        let made = if self.raw {
            Ok(key.clone())
        } else {
            self.python_made_key(key, version).map(Bound::into_any)
        };
        match made.and_then(|m| PyString::new(py, "Key '%s' not found").rem((m,))) {
            Ok(msg) => PyValueError::new_err(msg.unbind()),
            Err(e) => e,
        }
    }

    /// The expiry stamp for a Django timeout argument.
    fn deadline(&self, timeout: &Bound<'_, PyAny>, now: u64) -> PyResult<u64> {
        let seconds = if timeout.is(&self.sentinel) {
            self.default_timeout
        } else if timeout.is_none() {
            None
        } else {
            Some(timeout_seconds(timeout)?)
        };
        // LocMemCache's expiry `time.time() + nan` compares false with every time: never expires.
        Ok(clock::deadline(now, seconds.filter(|s| !s.is_nan())))
    }

    /// Tag stamps for `tags` (an iterable of str), namespaced by the key prefix.
    fn stamps(&self, tags: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<TagStamp>> {
        if let Some(snap) = tags.and_then(|t| t.cast::<TagSnapshot>().ok()) {
            return Ok(snap.get().stamps.clone());
        }
        let names = self.tag_names(tags)?;
        Ok(if names.is_empty() {
            Vec::new()
        } else {
            self.store.tags.stamps(names.iter().map(String::as_str))
        })
    }

    fn tag_names(&self, tags: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<String>> {
        let Some(tags) = tags.filter(|t| !t.is_none()) else {
            return Ok(Vec::new());
        };
        if tags.is_instance_of::<PyString>() {
            return Err(PyTypeError::new_err(
                "tags must be an iterable of str, not a str",
            ));
        }
        let mut names = Vec::new();
        for tag in tags.try_iter()? {
            let tag = tag?;
            let s = tag.cast::<PyString>().map_err(|_| {
                PyTypeError::new_err(format!(
                    "each tag must be a str, not {}",
                    tag.get_type()
                        .name()
                        .map(|n| n.to_string())
                        .unwrap_or_default()
                ))
            })?;
            // The prefix's length first: prefix "a" with tag "b:c" is not prefix "a:b" with "c".
            names.push(format!(
                "{}:{}:{}",
                self.prefix.len(),
                self.prefix,
                store_text(s)?
            ));
        }
        Ok(names)
    }

    /// Encodes and stores (`add` when `only_new`, else `set`); returns the outcome, the made key
    /// and the expiry stamp it stored with.
    fn put_at(
        &self,
        key: &Bound<'_, PyAny>,
        value: &Bound<'_, PyAny>,
        timeout: &Bound<'_, PyAny>,
        version: Option<&Bound<'_, PyAny>>,
        tags: Option<&Bound<'_, PyAny>>,
        only_new: bool,
    ) -> PyResult<(Put, MadeKey, u64)> {
        let k = self.key(key, version)?;
        let stored = encode(value)?;
        let stamps = self.stamps(tags)?;
        let now = clock::now();
        let expires = self.deadline(timeout, now)?;
        let put = if only_new {
            self.store
                .add(&k, stored, expires, stamps, &self.limits, now)
        } else {
            self.store
                .set(&k, stored, expires, stamps, &self.limits, now)
        };
        Ok((put, k, expires))
    }

    /// NearCache's L1 read of `key`: a plain hit only while the attached lease is fresh.
    fn near_probe(
        &self,
        py: Python<'_>,
        hit: &NearHit,
        key: &Bound<'_, PyAny>,
        version: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Probe> {
        let now = clock::now();
        if !hit.fresh_at(now) {
            return Ok(Probe::Rest(hit.stale.clone_ref(py)));
        }
        let k = self.key(key, version)?;
        Ok(match self.read(py, &k, now)? {
            Some(v) if hit.is_tagged(v.bind(py)) => Probe::Rest(v),
            Some(v) => Probe::Hit(v),
            None => Probe::Rest(hit.miss.clone_ref(py)),
        })
    }

    fn near_hit(&self) -> PyResult<&NearHit> {
        self.near_hit
            .as_ref()
            .ok_or_else(|| PyTypeError::new_err("no NearCache is attached to this handle"))
    }

    /// The made key as the store names it, with Django's key warnings (for `Fill.put`).
    pub(super) fn made_key(
        &self,
        key: &Bound<'_, PyAny>,
        version: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<MadeKey> {
        self.key(key, version)
    }

    /// The expiry stamp for a Django timeout argument (for `Fill.put`).
    pub(super) fn expiry_for(&self, timeout: &Bound<'_, PyAny>, now: u64) -> PyResult<u64> {
        self.deadline(timeout, now)
    }

    pub(super) fn limits(&self) -> &Limits {
        &self.limits
    }

    fn read(&self, py: Python<'_>, k: &str, now: u64) -> PyResult<Option<Py<PyAny>>> {
        match self
            .store
            .get_entry(k, now, |e| e.value().clone_ref(py, e.payload()))
        {
            Some(v) => Ok(Some(decode(py, v?)?)),
            None => Ok(None),
        }
    }
}

#[pymethods]
impl Handle {
    /// The handle on the store named `location`, created on first use with `policy` (when None:
    /// "lru" for one shard, "tinylfu" for more, see `Policy::default_for`; a later None takes the
    /// store's) and `shards` shards (when None: one for a `max_entries` of up to 65,536, else 16;
    /// see `store::shards_for`). ValueError for an unknown policy, or one other than that of the
    /// existing store of that name (one store per LOCATION has one policy).
    #[new]
    #[pyo3(signature = (location, sentinel, warn, shards = None, policy = None, max_entries = 300))]
    fn new(
        location: &Bound<'_, PyString>,
        sentinel: Py<PyAny>,
        warn: Py<PyAny>,
        shards: Option<usize>,
        policy: Option<&str>,
        max_entries: i64,
    ) -> PyResult<Self> {
        let policy = policy
            .map(str::parse::<Policy>)
            .transpose()
            .map_err(PyValueError::new_err)?;
        let shards = shards.unwrap_or_else(|| crate::store::shards_for(max_entries));
        let location = store_text(location)?.into_owned();
        let store = registry::store(&location, shards, policy).map_err(|existing| {
            PyValueError::new_err(format!(
                "the store of this LOCATION was created with EVICTION_POLICY '{existing}'; \
                 every alias naming it must use that policy"
            ))
        })?;
        Ok(Handle {
            store,
            location,
            prefix: String::new(),
            version: "1".to_owned(),
            prefix_obj: None,
            version_obj: None,
            raw: false,
            default_timeout: Some(300.0),
            limits: Limits::default(),
            sentinel,
            warn,
            near_hit: None,
        })
    }

    /// Makes `near_get`/`near_peek` answer for a NearCache: L1 may serve while `near`'s lease
    /// is fresh; an entry of type `tagged`, a miss (`miss`) or a lease that is not fresh
    /// (`stale`) goes to `fallback(key, default, version, found)`.
    fn near_attach(
        &mut self,
        near: Py<Near>,
        tagged: Py<PyType>,
        miss: Py<PyAny>,
        stale: Py<PyAny>,
        fallback: Bound<'_, PyAny>,
    ) -> PyResult<()> {
        if !fallback.is_callable() {
            return Err(PyTypeError::new_err("the fallback must be callable"));
        }
        self.near_hit = Some(NearHit::new(near, tagged, miss, stale, fallback.unbind()));
        Ok(())
    }

    /// Undoes `near_attach`.
    fn near_detach(&mut self) {
        self.near_hit = None;
    }

    /// NearCache's `get`: an L1 hit (lease fresh, key present, not a tagged entry) answered here,
    /// as `get` answers it (the isolated copy); anything else is the fallback's result, called
    /// with no borrow of this handle held.
    #[pyo3(signature = (key, default = None, version = None))]
    fn near_get(
        slf: &Bound<'_, Self>,
        key: &Bound<'_, PyAny>,
        default: Option<Bound<'_, PyAny>>,
        version: Option<Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        let (fallback, found) = {
            let this = slf.try_borrow()?;
            let hit = this.near_hit()?;
            match this.near_probe(py, hit, key, version.as_ref())? {
                Probe::Hit(v) => return Ok(v),
                Probe::Rest(found) => (hit.fallback.clone_ref(py), found),
            }
        };
        let none = || py.None().into_bound(py);
        let args = PyTuple::new(
            py,
            [
                key.clone(),
                default.unwrap_or_else(none),
                version.unwrap_or_else(none),
                found.into_bound(py),
            ],
        )?;
        Ok(fallback.bind(py).call1(args)?.unbind())
    }

    /// NearCache's L1 read without the fallback (for `aget`): the value of a plain hit, else
    /// what `near_get` would hand its fallback (the `stale` or `miss` marker, or the tagged entry).
    #[pyo3(signature = (key, version = None))]
    fn near_peek(
        &self,
        py: Python<'_>,
        key: &Bound<'_, PyAny>,
        version: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        match self.near_probe(py, self.near_hit()?, key, version)? {
            Probe::Hit(v) | Probe::Rest(v) => Ok(v),
        }
    }

    /// The L1 part of NearCache's `get_many`: None if the attached lease is not fresh (L1 not
    /// read, `keys` not consumed); else `(found, rest, lacking)`: `found` maps each key L1 holds
    /// to its value (a tagged entry as it is, for Python to check), `rest` maps the made key (as
    /// Django makes it) of every key that is not a plain hit to that key, `lacking` lists the made
    /// keys L1 does not hold. Keys making the same made key count once, under the last of them
    /// (as the `{made: key}` map of Django's RedisCache).
    #[pyo3(signature = (keys, version = None))]
    #[allow(clippy::type_complexity)]
    fn near_many<'py>(
        &self,
        py: Python<'py>,
        keys: &Bound<'py, PyAny>,
        version: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Option<(Bound<'py, PyDict>, Bound<'py, PyDict>, Bound<'py, PyList>)>> {
        let hit = self.near_hit()?;
        let now = clock::now();
        if !hit.fresh_at(now) {
            return Ok(None);
        }
        let mut made: Vec<(MadeKey, Bound<'py, PyAny>)> = Vec::new();
        let mut seen: HashMap<String, usize, RandomState> = HashMap::default();
        for key in keys.try_iter()? {
            let key = key?;
            let k = self.key(&key, version)?;
            match seen.entry(k.to_string()) {
                Entry::Occupied(at) => made[*at.get()].1 = key,
                Entry::Vacant(at) => {
                    at.insert(made.len());
                    made.push((k, key));
                }
            }
        }
        let found = PyDict::new(py);
        let rest = PyDict::new(py);
        let lacking = PyList::empty(py);
        for (k, key) in &made {
            match self.read(py, k, now)? {
                Some(v) if hit.is_tagged(v.bind(py)) => {
                    found.set_item(key, v)?;
                    rest.set_item(unescape(py, k)?, key)?;
                }
                Some(v) => found.set_item(key, v)?,
                None => {
                    let m = unescape(py, k)?;
                    rest.set_item(&m, key)?;
                    lacking.append(m)?;
                }
            }
        }
        Ok(Some((found, rest, lacking)))
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.sentinel)?;
        visit.call(&self.warn)?;
        visit.call(&self.prefix_obj)?;
        visit.call(&self.version_obj)?;
        match &self.near_hit {
            Some(hit) => hit.traverse(&visit),
            None => Ok(()),
        }
    }

    fn __clear__(&mut self) {
        // The fallback (a NearCache's bound method) is what closes a reference cycle.
        self.near_hit = None;
    }

    /// Sets the key prefix, default version, default timeout (seconds, None for never) and mode.
    fn configure(
        &mut self,
        prefix: &Bound<'_, PyAny>,
        version: &Bound<'_, PyAny>,
        default_timeout: Option<f64>,
        raw: bool,
    ) -> PyResult<()> {
        let mut p = String::new();
        push_part_escaped(&mut p, prefix)?;
        let mut v = String::new();
        push_part_escaped(&mut v, version)?;
        self.prefix = p;
        self.version = v;
        self.prefix_obj = Some(prefix.clone().unbind());
        self.version_obj = Some(version.clone().unbind());
        self.default_timeout = default_timeout;
        self.raw = raw;
        Ok(())
    }

    #[pyo3(signature = (max_entries, cull_frequency, max_bytes = None))]
    fn set_limits(&mut self, max_entries: i64, cull_frequency: i64, max_bytes: Option<u64>) {
        self.limits = Limits {
            max_entries,
            cull_frequency,
            max_bytes,
        };
    }

    #[getter]
    fn location<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyString>> {
        unescape(py, &self.location)
    }

    /// The store's eviction policy: "lru", "s3fifo" or "tinylfu".
    #[getter]
    fn eviction_policy(&self) -> &'static str {
        self.store.policy().name()
    }

    /// The made key, as Django's default key function makes it (not the store's escaped text).
    #[pyo3(signature = (key, version = None))]
    fn make_key<'py>(
        &self,
        key: &Bound<'py, PyAny>,
        version: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyString>> {
        unescape(key.py(), &self.key(key, version)?)
    }

    #[pyo3(signature = (key, default = None, version = None))]
    fn get(
        &self,
        py: Python<'_>,
        key: &Bound<'_, PyAny>,
        default: Option<Py<PyAny>>,
        version: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let k = self.key(key, version)?;
        match self.read(py, &k, clock::now())? {
            Some(v) => Ok(v),
            None => Ok(default.unwrap_or_else(|| py.None())),
        }
    }

    /// Stores the value; False if it alone is larger than MAX_BYTES (nothing is then stored).
    #[pyo3(signature = (key, value, timeout, version = None, tags = None))]
    fn set(
        &self,
        key: &Bound<'_, PyAny>,
        value: &Bound<'_, PyAny>,
        timeout: &Bound<'_, PyAny>,
        version: Option<&Bound<'_, PyAny>>,
        tags: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<bool> {
        Ok(self.put_at(key, value, timeout, version, tags, false)?.0 == Put::Stored)
    }

    /// `set` with Django's signature and result (None), so that `RustCache.set` can be this
    /// method itself (see `fast.rs`).
    #[pyo3(signature = (key, value, timeout = TimeoutArg::Default, version = None, tags = None))]
    fn set_value(
        &self,
        py: Python<'_>,
        key: &Bound<'_, PyAny>,
        value: &Bound<'_, PyAny>,
        timeout: TimeoutArg<'_>,
        version: Option<&Bound<'_, PyAny>>,
        tags: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let timeout = match timeout {
            TimeoutArg::Given(t) => t,
            TimeoutArg::Default => self.sentinel.bind(py).clone(),
        };
        self.put_at(key, value, &timeout, version, tags, false)?;
        Ok(())
    }

    #[pyo3(signature = (key, value, timeout, version = None, tags = None))]
    fn add(
        &self,
        key: &Bound<'_, PyAny>,
        value: &Bound<'_, PyAny>,
        timeout: &Bound<'_, PyAny>,
        version: Option<&Bound<'_, PyAny>>,
        tags: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<bool> {
        Ok(self.put_at(key, value, timeout, version, tags, true)?.0 == Put::Stored)
    }

    #[pyo3(signature = (key, version = None))]
    fn delete(&self, key: &Bound<'_, PyAny>, version: Option<&Bound<'_, PyAny>>) -> PyResult<bool> {
        let k = self.key(key, version)?;
        Ok(self.store.delete(&k, clock::now()))
    }

    #[pyo3(signature = (key, version = None))]
    fn has_key(
        &self,
        key: &Bound<'_, PyAny>,
        version: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<bool> {
        let k = self.key(key, version)?;
        Ok(self.store.contains(&k, clock::now()))
    }

    #[pyo3(signature = (key, timeout, version = None))]
    fn touch(
        &self,
        key: &Bound<'_, PyAny>,
        timeout: &Bound<'_, PyAny>,
        version: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<bool> {
        let k = self.key(key, version)?;
        let now = clock::now();
        let expires = self.deadline(timeout, now)?;
        Ok(self.store.touch(&k, expires, &self.limits, now))
    }

    /// Adds `delta` atomically, keeping the expiry. 64-bit integers are added in Rust; anything
    /// else (overflow, floats, other types) is added by Python outside the lock and stored only if
    /// the entry did not change meanwhile.
    #[pyo3(signature = (key, delta, version = None))]
    fn incr(
        &self,
        py: Python<'_>,
        key: &Bound<'_, PyAny>,
        delta: &Bound<'_, PyAny>,
        version: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let k = self.key(key, version)?;
        let now = clock::now();
        if let Some(d) = delta
            .cast_exact::<PyInt>()
            .ok()
            .and_then(|d| d.extract::<i64>().ok())
        {
            let done = self.store.update(&k, &self.limits, now, |v| match v {
                PyValue::Int(i) => i.checked_add(d).inspect(|n| *i = *n),
                _ => None,
            });
            match done {
                Err(()) => return Err(self.not_found(key, version, &k)),
                Ok(Some(n)) => return Ok(n.into_pyobject(py)?.into_any().unbind()),
                Ok(None) => {}
            }
        }
        loop {
            let Some((current, token)) = self
                .store
                .snapshot(&k, now, |e| e.value().clone_ref(py, e.payload()))
            else {
                return Err(self.not_found(key, version, &k));
            };
            let new = decode(py, current?)?.bind(py).add(delta)?;
            let stored = encode(&new)?;
            match self.store.replace_if(&k, token, stored, &self.limits, now) {
                Replace::Done => return Ok(new.unbind()),
                Replace::Conflict => continue,
                Replace::Missing => return Err(self.not_found(key, version, &k)),
                Replace::TooLarge => {
                    self.store.delete(&k, now);
                    return Ok(new.unbind());
                }
            }
        }
    }

    #[pyo3(signature = (keys, version = None))]
    fn get_many<'py>(
        &self,
        py: Python<'py>,
        keys: &Bound<'py, PyAny>,
        version: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let out = PyDict::new(py);
        let now = clock::now();
        for key in keys.try_iter()? {
            let key = key?;
            let k = self.key(&key, version)?;
            if let Some(v) = self.read(py, &k, now)? {
                out.set_item(key, v)?;
            }
        }
        Ok(out)
    }

    /// Stores every item; returns the keys not stored because they alone exceed MAX_BYTES.
    #[pyo3(signature = (data, timeout, version = None, tags = None))]
    fn set_many<'py>(
        &self,
        py: Python<'py>,
        data: &Bound<'py, PyAny>,
        timeout: &Bound<'py, PyAny>,
        version: Option<&Bound<'py, PyAny>>,
        tags: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyList>> {
        let failed = PyList::empty(py);
        let names = match tags.filter(|t| t.cast::<TagSnapshot>().is_err()) {
            Some(t) => self.tag_names(Some(t))?,
            None => Vec::new(),
        };
        for item in data.call_method0("items")?.try_iter()? {
            let (key, value): (Bound<'py, PyAny>, Bound<'py, PyAny>) = item?.extract()?;
            let k = self.key(&key, version)?;
            let stored = encode(&value)?;
            let stamps = match tags.and_then(|t| t.cast::<TagSnapshot>().ok()) {
                Some(snap) => snap.get().stamps.clone(),
                None if names.is_empty() => Vec::new(),
                None => self.store.tags.stamps(names.iter().map(String::as_str)),
            };
            let now = clock::now();
            let expires = self.deadline(timeout, now)?;
            if self
                .store
                .set(&k, stored, expires, stamps, &self.limits, now)
                == Put::TooLarge
            {
                failed.append(key)?;
            }
        }
        Ok(failed)
    }

    #[pyo3(signature = (keys, version = None))]
    fn delete_many(
        &self,
        keys: &Bound<'_, PyAny>,
        version: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let now = clock::now();
        for key in keys.try_iter()? {
            let k = self.key(&key?, version)?;
            self.store.delete(&k, now);
        }
        Ok(())
    }

    fn clear(&self) {
        self.store.clear();
    }

    /// Makes every entry carrying one of `tags` a miss; returns how many live entries that removed.
    fn invalidate_tags(&self, tags: &Bound<'_, PyAny>) -> PyResult<usize> {
        let names = self.tag_names(Some(tags))?;
        Ok(self
            .store
            .invalidate_tags(names.iter().map(String::as_str), clock::now()))
    }

    /// A read for `get_or_set` with early refresh: `(value, refresh)`, or `(default, False)` on a
    /// miss. `refresh` tells this caller to recompute the live value now, decided by
    /// `crate::early::should_refresh` (XFetch) from `beta`, the uniform draw `u` in (0, 1], the
    /// entry's expiry and its recorded compute time.
    #[pyo3(signature = (key, default, version, beta, u))]
    fn get_early(
        &self,
        py: Python<'_>,
        key: &Bound<'_, PyAny>,
        default: Py<PyAny>,
        version: Option<&Bound<'_, PyAny>>,
        beta: f64,
        u: f64,
    ) -> PyResult<(Py<PyAny>, bool)> {
        if !(beta.is_finite() && beta >= 0.0) {
            return Err(PyValueError::new_err(format!(
                "early_refresh must be a finite number >= 0, not {beta}"
            )));
        }
        if !(u > 0.0 && u <= 1.0) {
            return Err(PyValueError::new_err(format!(
                "the early-refresh random draw must be in (0, 1], not {u}"
            )));
        }
        let k = self.key(key, version)?;
        let now = clock::now();
        let found = self.store.get_entry(&k, now, |e| {
            (
                e.value().clone_ref(py, e.payload()),
                crate::early::should_refresh(now, e.expires(), e.delta(), beta, u),
            )
        });
        match found {
            Some((v, refresh)) => Ok((decode(py, v?)?, refresh)),
            None => Ok((default, false)),
        }
    }

    /// The current versions of `tags`, to pass as `tags=` when storing a value computed after.
    fn snapshot_tags(&self, tags: &Bound<'_, PyAny>) -> PyResult<TagSnapshot> {
        let stamps = self.stamps(Some(tags))?;
        // Cells made for it are charged as they are made: evict for them, as an insert would.
        self.store.keep_within(&self.limits, clock::now());
        Ok(TagSnapshot { stamps })
    }

    /// The caller's keys (made key minus `prefix:version:`, lone surrogates and U+FFFF restored)
    /// of live entries under this prefix and `version`. Scans the store; raw mode cannot reverse a
    /// custom key function.
    #[pyo3(signature = (version = None))]
    fn keys<'py>(
        &self,
        py: Python<'py>,
        version: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Vec<Bound<'py, PyString>>> {
        if self.raw {
            return Err(PyTypeError::new_err(
                "listing keys needs Django's default KEY_FUNCTION (a custom one cannot be reversed)",
            ));
        }
        let mut head = String::with_capacity(self.prefix.len() + self.version.len() + 2);
        head.push_str(&self.prefix);
        head.push(':');
        match version {
            Some(v) if !v.is_none() => push_part_escaped(&mut head, v)?,
            _ => head.push_str(&self.version),
        }
        head.push(':');
        self.store
            .keys_with_prefix(&head, clock::now())
            .iter()
            .map(|k| unescape(py, &k[head.len()..]))
            .collect()
    }

    /// Wall-clock time (as `time.time()`) at which the live entry expires; None for never or missing.
    #[pyo3(signature = (key, version = None))]
    fn expiry(
        &self,
        key: &Bound<'_, PyAny>,
        version: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Option<f64>> {
        let k = self.key(key, version)?;
        Ok(match self.store.expiry(&k, clock::now()) {
            Some(e) if e != NEVER => Some(wall_epoch() + e as f64 / 1e9),
            _ => None,
        })
    }

    /// Seconds left: None for no expiry, 0 for a missing or expired key (django-redis's rule).
    #[pyo3(signature = (key, version = None))]
    fn ttl(
        &self,
        key: &Bound<'_, PyAny>,
        version: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Option<f64>> {
        let k = self.key(key, version)?;
        let now = clock::now();
        Ok(match self.store.expiry(&k, now) {
            Some(e) => clock::remaining(now, e),
            None => Some(0.0),
        })
    }

    /// Begins a fill of the made key `key` (`store::Fill`): a guard whose `put` stores once,
    /// only if no removal, invalidation, local write or flush of the key, newer fill of it or
    /// invalidation of `tags` (their versions are taken now) came in between; ended by `put`,
    /// by leaving its `with` block or by its deallocation. With `wait` (seconds) the fill takes
    /// the key's single-flight: if another thread's fill leads the key, this returns None after
    /// waiting, without the GIL, until that fill ends or `wait` passes (at once for a `wait` of 0
    /// or less: `aget_or_set` polls instead of blocking its loop); read the key again then. With
    /// `exclusive`, None at once if any fill leads the key, even this thread's (early refresh).
    #[pyo3(signature = (key, wait = None, exclusive = false, tags = None))]
    fn fill(
        slf: &Bound<'_, Self>,
        key: &Bound<'_, PyString>,
        wait: Option<f64>,
        exclusive: bool,
        tags: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Option<Fill>> {
        let py = slf.py();
        let this = slf.borrow();
        let k = flight_name(key)?;
        let limit = match wait {
            Some(w) if w > 0.0 || w.is_nan() => Some(
                Duration::try_from_secs_f64(w)
                    .map_err(|e| PyValueError::new_err(format!("bad wait: {e}")))?,
            ),
            _ => None,
        };
        let stamps = this.stamps(tags)?;
        let lead = match (exclusive, wait) {
            (true, _) => Lead::Try,
            (false, Some(_)) => Lead::Join,
            (false, None) => Lead::Alone,
        };
        match this
            .store
            .fill(&k, lead, stamps, &this.limits, clock::now())
        {
            Begun::Lead(fill) => Ok(Some(Fill::new(fill, slf.clone().unbind()))),
            Begun::Busy => Ok(None),
            Begun::Follow(flight) => {
                drop(this);
                if let Some(limit) = limit {
                    py.detach(|| flight.wait(limit));
                }
                Ok(None)
            }
        }
    }

    /// Drops the entries and fill placeholders of these made keys (as Redis names them);
    /// returns how many entries it removed.
    fn invalidate_made(&self, made_keys: &Bound<'_, PyAny>) -> PyResult<usize> {
        let mut removed = 0;
        for k in made_keys.try_iter()? {
            let k = k?;
            let k = k.cast::<PyString>().map_err(|_| {
                PyTypeError::new_err("invalidate_made takes an iterable of str (made keys)")
            })?;
            if self.store.invalidate_key(&flight_name(k)?) {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Whether any of the store's locks is held right now.
    fn locked(&self) -> bool {
        self.store.is_locked()
    }

    fn __len__(&self) -> usize {
        self.store.len()
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.store.stats.snapshot();
        let d = PyDict::new(py);
        d.set_item("hits", s.hits)?;
        d.set_item("misses", s.misses)?;
        d.set_item("sets", s.sets)?;
        d.set_item("deletes", s.deletes)?;
        d.set_item("evictions", s.evictions)?;
        d.set_item("expirations", s.expirations)?;
        d.set_item("invalidations", s.invalidations)?;
        d.set_item("entries", self.store.len())?;
        d.set_item("bytes", self.store.bytes())?;
        d.set_item("tags", self.store.tags.len())?;
        d.set_item("max_entries", self.limits.max_entries)?;
        d.set_item("cull_frequency", self.limits.cull_frequency)?;
        d.set_item("max_bytes", self.limits.max_bytes)?;
        d.set_item("location", unescape(py, &self.location)?)?;
        Ok(d)
    }
}
