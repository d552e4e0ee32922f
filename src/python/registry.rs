//! One store per `LOCATION` per process, shared by every backend instance (Django makes one per
//! thread) that names it.

use std::sync::{Arc, OnceLock};

use ahash::RandomState;
use hashbrown::HashMap;
use parking_lot::Mutex;

use super::value::PyValue;
use crate::store::Store;

type Registry = Mutex<HashMap<String, Arc<Store<PyValue>>, RandomState>>;

fn registry() -> &'static Registry {
    static STORES: OnceLock<Registry> = OnceLock::new();
    STORES.get_or_init(Default::default)
}

/// The store named `location`, created with `shards` shards on first use.
pub fn store(location: &str, shards: usize) -> Arc<Store<PyValue>> {
    registry()
        .lock()
        .entry(location.to_owned())
        .or_insert_with(|| Arc::new(Store::new(shards)))
        .clone()
}
