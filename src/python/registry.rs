//! One store per `LOCATION` per process, shared by every backend instance (Django makes one per
//! thread) that names it.

use std::sync::{Arc, OnceLock};

use ahash::RandomState;
use hashbrown::HashMap;
use parking_lot::Mutex;

use super::value::PyValue;
use crate::policy::Policy;
use crate::store::Store;

type Registry = Mutex<HashMap<String, Arc<Store<PyValue>>, RandomState>>;

static STORES: OnceLock<Registry> = OnceLock::new();

fn registry() -> &'static Registry {
    STORES.get_or_init(Default::default)
}

/// fork's prepare step (see `crate::fork` for the order): the registry's lock, then every store's
/// locks, kept locked.
pub fn lock_for_fork() {
    let Some(reg) = STORES.get() else { return };
    let stores = reg.lock();
    for store in stores.values() {
        store.lock_for_fork();
    }
    std::mem::forget(stores);
}

/// Releases what `lock_for_fork` took; in a forked `child`, every store first forgets its
/// in-flight records (their leaders are threads the child does not have).
///
/// # Safety
/// `lock_for_fork` ran in this thread (or in the thread of the parent that forked this child) and
/// nothing released its locks since.
pub unsafe fn unlock_after_fork(child: bool) {
    let Some(reg) = STORES.get() else { return };
    // SAFETY: this thread holds the registry's lock (taken by `lock_for_fork`).
    let stores = unsafe { &*reg.data_ptr() };
    for store in stores.values() {
        unsafe { store.unlock_after_fork(child) };
    }
    unsafe { reg.force_unlock() };
}

/// The store named `location`, created with `shards` shards and `policy` on first use (if None,
/// `Policy::default_for(shards)`). Asking for a policy other than the existing store's gives
/// `Err` with the store's policy; None takes the store's.
pub fn store(
    location: &str,
    shards: usize,
    policy: Option<Policy>,
) -> Result<Arc<Store<PyValue>>, Policy> {
    let store = registry()
        .lock()
        .entry(location.to_owned())
        .or_insert_with(|| {
            let policy = policy.unwrap_or_else(|| Policy::default_for(shards));
            Arc::new(Store::with_policy(shards, policy))
        })
        .clone();
    match policy {
        Some(p) if p != store.policy() => Err(store.policy()),
        _ => Ok(store),
    }
}

/// The store named `location` if one was made (the near-cache listener looks its L1 up this way,
/// so that it never creates one with other settings than the backend's).
pub fn existing(location: &str) -> Option<Arc<Store<PyValue>>> {
    registry().lock().get(location).cloned()
}
