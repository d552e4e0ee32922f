//! `Near` for Python: the invalidation listener and lease of one L1 store (`crate::near`), and
//! `near()`, the process-wide one per L1 location.
//!
//! The listener applies invalidations to the L1 `Store<PyValue>` without the GIL. The entries it
//! removes hold Python objects: it does not drop them (PyO3 0.30 would queue each decref in its
//! reference pool, whose mutex the listener would then hold at instants a fork could copy it
//! locked into a child, which would hang at its next call into PyO3). It buries them in a
//! lock-free `Graveyard` instead, and `Near`'s methods (`fresh` on every L1 read) drop them with
//! the GIL held and no lock of ours held, so any `__del__` runs there.
//!
//! Locks: `Near`'s own mutexes are only taken with the GIL held and never across a GIL release,
//! so `os.fork()` (which holds the GIL) cannot copy them locked into a child. Joining the
//! listener thread happens without the GIL, after it was taken out under the lock.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ahash::RandomState;
use hashbrown::HashMap;
use parking_lot::Mutex;
use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyType};
use pyo3::{PyTraverseError, PyVisit};

use super::registry;
use super::value::PyValue;
use crate::near::listener::{Config, Endpoint, Mode};
use crate::near::sentinel::Sentinels;
use crate::near::tls::{self, Tls};
use crate::near::{self as rust_near, Graveyard, Sink};
use crate::shard::Entry;
use crate::store::Store;

type Dead = Graveyard<Entry<PyValue>>;

/// The L1 store named `location`, found once it exists (a `Handle` creates it with its shards
/// and policy; the listener must not create it with others). Until then there is nothing in L1
/// to invalidate or flush.
struct LazyStore {
    location: String,
    store: OnceLock<Arc<Store<PyValue>>>,
    dead: Arc<Dead>,
}

impl LazyStore {
    fn get(&self) -> Option<&Arc<Store<PyValue>>> {
        if let Some(s) = self.store.get() {
            return Some(s);
        }
        let found = registry::existing(&self.location)?;
        Some(self.store.get_or_init(|| found))
    }
}

impl Sink for LazyStore {
    // Both take store locks (and the registry's) without the GIL: in a `Quiet` section, so that
    // a fork never finds this thread parked on a lock its prepare step holds (`crate::fork`).
    fn invalidate(&self, key: &str) {
        let _quiet = crate::fork::quiet();
        if let Some(s) = self.get() {
            let mut dead = Vec::new();
            s.invalidate_key_into(key, &mut dead);
            self.dead.bury(dead);
        }
    }

    fn flush(&self) {
        let _quiet = crate::fork::quiet();
        if let Some(s) = self.get() {
            let mut dead = Vec::new();
            s.clear_into(&mut dead);
            self.dead.bury(dead);
        }
    }
}

/// The invalidation listener and lease of one L1 store; one per (process, l1_location).
#[pyclass(module = "django_rustcache._core", frozen)]
pub struct Near {
    inner: rust_near::Near,
    location: String,
    /// What the listener removed, dropped here with the GIL.
    dead: Arc<Dead>,
}

fn seconds(name: &str, s: f64) -> PyResult<Duration> {
    if !(s.is_finite() && s > 0.0) {
        return Err(PyValueError::new_err(format!(
            "{name} must be a finite number of seconds > 0, not {s}"
        )));
    }
    Duration::try_from_secs_f64(s).map_err(|e| PyValueError::new_err(format!("{name}: {e}")))
}

#[allow(clippy::too_many_arguments)]
fn make_config(
    host: Option<String>,
    port: i64,
    unix_path: Option<String>,
    username: Option<String>,
    password: Option<String>,
    prefix: String,
    lease: f64,
    mode: &str,
    channel: String,
    connect_timeout: f64,
    tls: Option<&Bound<'_, PyDict>>,
    sentinel: Option<&Bound<'_, PyDict>>,
) -> PyResult<Config> {
    let endpoint = match (host, unix_path, sentinel) {
        (None, None, Some(d)) => sentinel_settings(d)?,
        (_, _, Some(_)) => {
            return Err(PyValueError::new_err(
                "give either sentinel or host/unix_path, not both",
            ))
        }
        (Some(_), Some(_), None) => {
            return Err(PyValueError::new_err(
                "give either host or unix_path, not both",
            ))
        }
        (None, Some(path), None) => Endpoint::Unix(PathBuf::from(path)),
        (Some(host), None, None) => {
            let port = u16::try_from(port)
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| PyValueError::new_err(format!("bad port {port}")))?;
            Endpoint::Tcp { host, port }
        }
        (None, None, None) => return Err(PyValueError::new_err("give a host or a unix_path")),
    };
    let tls = match tls {
        None => None,
        Some(_) if matches!(endpoint, Endpoint::Unix(_)) => {
            return Err(PyValueError::new_err(
                "TLS needs a host and port, not a unix_path",
            ))
        }
        Some(_) if matches!(endpoint, Endpoint::Sentinel(_)) => {
            return Err(PyValueError::new_err(
                "TLS behind Sentinel is not supported by the listener",
            ))
        }
        Some(d) => Some(tls_settings(d)?),
    };
    let mode = match mode {
        "bcast" => Mode::Bcast,
        "pubsub" if channel.is_empty() => {
            return Err(PyValueError::new_err("pubsub mode needs a channel"))
        }
        "pubsub" => Mode::Pubsub(channel),
        other => {
            return Err(PyValueError::new_err(format!(
                "mode must be 'bcast' or 'pubsub', not {other:?}"
            )))
        }
    };
    Ok(Config {
        endpoint,
        username,
        password,
        prefix,
        lease: seconds("lease", lease)?,
        mode,
        connect_timeout: seconds("connect_timeout", connect_timeout)?,
        tls,
    })
}

/// The listener's Sentinel endpoint from `sentinel`: `sentinels` (a list of (host, port)),
/// `service`, and optionally `username` and `password` for the sentinels themselves. With it,
/// `host` and `unix_path` must be None.
fn sentinel_settings(d: &Bound<'_, PyDict>) -> PyResult<Endpoint> {
    const KEYS: [&str; 4] = ["sentinels", "service", "username", "password"];
    for k in d.keys() {
        let k: String = k.extract()?;
        if !KEYS.contains(&k.as_str()) {
            return Err(PyValueError::new_err(format!(
                "unknown sentinel setting {k:?}; expected one of {KEYS:?}"
            )));
        }
    }
    let get = |k: &str| -> PyResult<Option<Bound<'_, PyAny>>> {
        Ok(d.get_item(k)?.filter(|v| !v.is_none()))
    };
    let mut addrs = Vec::new();
    if let Some(list) = get("sentinels")? {
        for item in list.try_iter()? {
            let (host, port): (String, i64) = item?.extract()?;
            let port = u16::try_from(port)
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| PyValueError::new_err(format!("bad sentinel port {port}")))?;
            addrs.push((host, port));
        }
    }
    if addrs.is_empty() {
        return Err(PyValueError::new_err("give at least one sentinel"));
    }
    let service: String = match get("service")? {
        Some(v) => v.extract()?,
        None => String::new(),
    };
    if service.is_empty() {
        return Err(PyValueError::new_err("give the sentinels' service name"));
    }
    let text = |k: &str| -> PyResult<Option<String>> { get(k)?.map(|v| v.extract()).transpose() };
    Ok(Endpoint::Sentinel(Sentinels::new(
        addrs,
        service,
        text("username")?,
        text("password")?,
    )))
}

/// The listener's TLS settings from `tls` (NearCache passes redis-py's `ssl_*` options, without
/// the prefix; absent keys take redis-py's defaults). The files are read once here, so that a
/// missing or bad file is a ValueError now rather than a listener that never connects.
fn tls_settings(d: &Bound<'_, PyDict>) -> PyResult<Tls> {
    const KEYS: [&str; 8] = [
        "ca_certs",
        "ca_data",
        "ca_path",
        "certfile",
        "keyfile",
        "cert_reqs",
        "check_hostname",
        "min_version",
    ];
    for k in d.keys() {
        let k: String = k.extract()?;
        if !KEYS.contains(&k.as_str()) {
            return Err(PyValueError::new_err(format!(
                "unknown TLS setting {k:?}; expected one of {KEYS:?}"
            )));
        }
    }
    let string = |k: &str| -> PyResult<Option<String>> {
        match d.get_item(k)? {
            Some(v) if !v.is_none() => Ok(Some(v.extract()?)),
            _ => Ok(None),
        }
    };
    let verify = match string("cert_reqs")?.as_deref() {
        None | Some("required") | Some("optional") => true,
        Some("none") => false,
        Some(other) => {
            return Err(PyValueError::new_err(format!(
                "cert_reqs must be 'required', 'optional' or 'none', not {other:?}"
            )))
        }
    };
    let check_hostname = match d.get_item("check_hostname")? {
        Some(v) if !v.is_none() => v.extract::<bool>()?,
        _ => true,
    };
    let tls13_only = match string("min_version")?.as_deref() {
        None | Some("1.2") => false,
        Some("1.3") => true,
        Some(other) => {
            return Err(PyValueError::new_err(format!(
                "min_version must be '1.2' or '1.3', not {other:?}"
            )))
        }
    };
    let t = Tls {
        ca_certs: string("ca_certs")?.map(PathBuf::from),
        ca_data: string("ca_data")?,
        ca_path: string("ca_path")?.map(PathBuf::from),
        certfile: string("certfile")?.map(PathBuf::from),
        keyfile: string("keyfile")?.map(PathBuf::from),
        verify,
        // As redis-py: no chain verification, no name verification.
        check_hostname: verify && check_hostname,
        tls13_only,
    };
    tls::client_config(&t).map_err(PyValueError::new_err)?;
    Ok(t)
}

/// A `Near` for `location`: its listener's sink buries removed entries in `dead`.
fn make(location: String, config: Config) -> Near {
    let dead = Arc::new(Dead::default());
    let sink = Arc::new(LazyStore {
        location: location.clone(),
        store: OnceLock::new(),
        dead: dead.clone(),
    });
    Near {
        inner: rust_near::Near::new(config, sink),
        location,
        dead,
    }
}

impl Near {
    /// Drops what the listener removed (the caller holds the GIL: decrefs happen now).
    #[inline]
    fn bury_dead(&self) {
        if !self.dead.is_empty() {
            drop(self.dead.take());
        }
    }

    fn stop_running(&self, py: Python<'_>, running: Option<crate::near::listener::Running>) {
        if let Some(r) = running {
            py.detach(move || r.stop());
        }
    }
}

#[pymethods]
impl Near {
    #[new]
    #[pyo3(signature = (l1_location, *, host, port, unix_path, username, password, prefix,
                        lease, mode, channel, connect_timeout, tls=None, sentinel=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        l1_location: String,
        host: Option<String>,
        port: i64,
        unix_path: Option<String>,
        username: Option<String>,
        password: Option<String>,
        prefix: String,
        lease: f64,
        mode: &str,
        channel: String,
        connect_timeout: f64,
        tls: Option<Bound<'_, PyDict>>,
        sentinel: Option<Bound<'_, PyDict>>,
    ) -> PyResult<Self> {
        crate::fork::install();
        let config = make_config(
            host,
            port,
            unix_path,
            username,
            password,
            prefix,
            lease,
            mode,
            channel,
            connect_timeout,
            tls.as_ref(),
            sentinel.as_ref(),
        )?;
        Ok(make(l1_location, config))
    }

    /// Starts the listener unless it runs in this process already (one atomic load then); in a
    /// forked child, starts a new one (which flushes L1 before the lease can be fresh).
    fn ensure_started(&self) -> PyResult<()> {
        self.bury_dead();
        self.inner
            .ensure_started()
            .map_err(|e| PyOSError::new_err(format!("cannot start the listener thread: {e}")))
    }

    /// The lease is valid now: L1 may serve a hit.
    fn fresh(&self) -> bool {
        self.bury_dead();
        self.inner.fresh()
    }

    /// Waits (without the GIL) until the lease is valid or `timeout` seconds pass.
    fn wait_fresh(&self, py: Python<'_>, timeout: f64) -> PyResult<bool> {
        let t = if timeout <= 0.0 {
            Duration::ZERO
        } else {
            seconds("timeout", timeout)?
        };
        let fresh = py.detach(|| self.inner.wait_fresh(t));
        self.bury_dead();
        Ok(fresh)
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        self.bury_dead();
        let s = self.inner.stats();
        let d = PyDict::new(py);
        d.set_item("invalidations", s.invalidations)?;
        d.set_item("flushes", s.flushes)?;
        d.set_item("reconnects", s.reconnects)?;
        d.set_item("connected", s.connected)?;
        d.set_item("lease_ok", s.lease_ok)?;
        d.set_item("last_pong_rtt_ms", s.last_pong_rtt_ms)?;
        d.set_item("last_error", s.last_error)?;
        let now = crate::near::record::monotonic_ns();
        d.set_item(
            "last_invalidation_age_ms",
            s.last_invalidation_ns
                .map(|t| now.saturating_sub(t) as f64 / 1e6),
        )?;
        d.set_item(
            "last_invalidation_lag_ms",
            s.last_lag_ns.map(|ns| ns as f64 / 1e6),
        )?;
        d.set_item("invalidation_lags_measured", s.lag_samples)?;
        d.set_item("master_switches", s.master_switches)?;
        d.set_item(
            "sentinel_watched",
            s.watching.map(|(host, port)| format!("{host}:{port}")),
        )?;
        d.set_item("sentinel_watch_error", s.watch_error)?;
        Ok(d)
    }

    /// This process is about to send writes of `keys` (made keys): the first invalidation of
    /// each that the listener applies gives `stats()["last_invalidation_lag_ms"]`.
    fn note_writes(&self, keys: &Bound<'_, PyAny>) -> PyResult<()> {
        let mut noted = Vec::new();
        for k in keys.try_iter()? {
            noted.push(k?.extract::<String>()?);
        }
        self.inner.note_writes(noted.iter().map(String::as_str));
        Ok(())
    }

    /// CLOCK_MONOTONIC ns (Python's `time.monotonic_ns()` on Linux) when this process's
    /// listener last applied an invalidation of the made key `key`, or None (none seen, or its
    /// slot in the record was taken by a later key).
    fn applied_ns(&self, key: &str) -> Option<u64> {
        self.inner.applied_ns(key)
    }

    /// Behind Sentinel: the last master switch (`+switch-master`) this process's listener
    /// acted on, as `(epoch, (master_host, master_port), (sentinel_host, sentinel_port))`: its
    /// `sentinel_switches()` count, the new master, and the sentinel that announced it (ask
    /// that one first: the others may not have switched yet). None: none (since a fork).
    #[allow(clippy::type_complexity)]
    fn master_switch(&self) -> Option<(u64, (String, u16), (String, u16))> {
        self.inner
            .last_switch()
            .map(|s| (s.epoch, s.master, s.sentinel))
    }

    /// Stops the thread (waiting for it without the GIL) and ends the lease.
    fn close(&self, py: Python<'_>) {
        let running = self.inner.take_running();
        self.stop_running(py, running);
        self.bury_dead();
    }

    #[getter]
    fn l1_location(&self) -> &str {
        &self.location
    }

    fn __repr__(&self) -> String {
        format!(
            "<Near {:?} {:?}>",
            self.location,
            self.inner.config().endpoint
        )
    }
}

/// What a `Handle` needs to answer NearCache's `get` itself (`Handle.near_get`): the `Near`
/// whose lease says whether L1 may serve, the type of tagged entries (which Python checks), the
/// two markers handed to the fallback, and the fallback: NearCache's Python rest of `get`.
pub(super) struct NearHit {
    near: Py<Near>,
    tagged: Py<PyType>,
    /// Given to the fallback when the key is not in L1 (the lease was fresh).
    pub(super) miss: Py<PyAny>,
    /// Given to the fallback when the lease was not fresh (L1 was not read).
    pub(super) stale: Py<PyAny>,
    /// Called as `fallback(key, default, version, found)` when L1 has no plain hit.
    pub(super) fallback: Py<PyAny>,
}

/// What L1 answers a NearCache read.
pub(super) enum Probe {
    /// A plain (untagged) hit: the value's isolated copy.
    Hit(Py<PyAny>),
    /// Anything else: what the fallback gets as `found` (`stale`, `miss` or the tagged entry).
    Rest(Py<PyAny>),
}

impl NearHit {
    pub(super) fn new(
        near: Py<Near>,
        tagged: Py<PyType>,
        miss: Py<PyAny>,
        stale: Py<PyAny>,
        fallback: Py<PyAny>,
    ) -> Self {
        NearHit {
            near,
            tagged,
            miss,
            stale,
            fallback,
        }
    }

    /// Whether L1 may serve at clock time `now` (the lease, in this fork generation), after
    /// dropping what the listener buried (the caller holds the GIL and none of our locks).
    #[inline]
    pub(super) fn fresh_at(&self, now: u64) -> bool {
        let near = self.near.get();
        near.bury_dead();
        near.inner.fresh_at(now)
    }

    /// Whether an L1 value is a tagged entry (its tags' versions are checked by Python).
    #[inline]
    pub(super) fn is_tagged(&self, value: &Bound<'_, PyAny>) -> bool {
        value.get_type().is(self.tagged.bind(value.py()))
    }

    pub(super) fn traverse(&self, visit: &PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.near)?;
        visit.call(&self.tagged)?;
        visit.call(&self.miss)?;
        visit.call(&self.stale)?;
        visit.call(&self.fallback)
    }
}

/// How many master switches (`+switch-master`) this process's listeners acted on: one atomic
/// load, for the data path to compare with the count it last saw on every command.
#[pyfunction]
pub fn sentinel_switches() -> u64 {
    crate::near::sentinel::switches()
}

type Nears = Mutex<HashMap<String, Py<Near>, RandomState>>;

fn nears() -> &'static Nears {
    static NEARS: OnceLock<Nears> = OnceLock::new();
    NEARS.get_or_init(Default::default)
}

/// The process-wide `Near` for `l1_location`, made on first use. Asked again with other
/// settings, the same object takes them (its listener restarts on the next `ensure_started`).
#[pyfunction]
#[pyo3(signature = (l1_location, *, host, port, unix_path, username, password, prefix, lease,
                    mode, channel, connect_timeout, tls=None, sentinel=None))]
#[allow(clippy::too_many_arguments)]
pub fn near(
    py: Python<'_>,
    l1_location: String,
    host: Option<String>,
    port: i64,
    unix_path: Option<String>,
    username: Option<String>,
    password: Option<String>,
    prefix: String,
    lease: f64,
    mode: &str,
    channel: String,
    connect_timeout: f64,
    tls: Option<Bound<'_, PyDict>>,
    sentinel: Option<Bound<'_, PyDict>>,
) -> PyResult<Py<Near>> {
    let config = make_config(
        host,
        port,
        unix_path,
        username,
        password,
        prefix,
        lease,
        mode,
        channel,
        connect_timeout,
        tls.as_ref(),
        sentinel.as_ref(),
    )?;
    let existing = nears().lock().get(&l1_location).map(|n| n.clone_ref(py));
    if let Some(n) = existing {
        let old = n.get().inner.reconfigure(config);
        n.get().stop_running(py, old);
        return Ok(n);
    }
    crate::fork::install();
    let made = Py::new(py, make(l1_location.clone(), config))?;
    let mut map = nears().lock();
    let n = map.entry(l1_location).or_insert(made).clone_ref(py);
    Ok(n)
}
