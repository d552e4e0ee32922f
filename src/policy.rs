//! Which entries an insert pushes out once the store is full: the store's eviction policy,
//! chosen per `LOCATION` when the store is created (`OPTIONS["EVICTION_POLICY"]`).

use std::fmt;
use std::str::FromStr;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Policy {
    /// Django's LocMemCache rule: at `MAX_ENTRIES` an insert culls `len / CULL_FREQUENCY` least
    /// recently used entries at once. Every hit moves the entry in a recency list (a write lock).
    #[default]
    Lru,
    /// S3-FIFO (Yang et al., SOSP 2023): a small FIFO for newcomers, a main FIFO for entries hit
    /// again, a ghost FIFO of recently evicted newcomers. `MAX_ENTRIES` is the capacity and
    /// entries are evicted one at a time; a hit only bumps an atomic counter under a read lock.
    S3Fifo,
    /// Adaptive W-TinyLFU (Caffeine's policy, `tinylfu.rs`): a window for newcomers whose size a
    /// hill climber adapts, a main region they enter only if a frequency sketch counts them
    /// more often than the entry they would displace. `MAX_ENTRIES` is the capacity; a hit
    /// bumps atomic counters under a read lock.
    TinyLfu,
}

impl Policy {
    /// The policy of a store of `shards` shards whose first alias names none: `"lru"` (Django's
    /// cull, LocMemCache's behaviour exactly) for one shard (`MAX_ENTRIES` up to 65,536),
    /// W-TinyLFU above, where `"lru"` evicts one entry per insert anyway and W-TinyLFU hits more
    /// on every stream of `benchmarks/hitratio_optimum.py` but recency-heavy traffic (within a
    /// point of LRU there). Decided once per store, like its shards.
    pub fn default_for(shards: usize) -> Self {
        if shards > 1 {
            Policy::TinyLfu
        } else {
            Policy::Lru
        }
    }

    /// The name used in `OPTIONS["EVICTION_POLICY"]`.
    pub fn name(self) -> &'static str {
        match self {
            Policy::Lru => "lru",
            Policy::S3Fifo => "s3fifo",
            Policy::TinyLfu => "tinylfu",
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Policy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "lru" => Ok(Policy::Lru),
            "s3fifo" => Ok(Policy::S3Fifo),
            "tinylfu" => Ok(Policy::TinyLfu),
            _ => Err(format!(
                "unknown eviction policy {s:?}; expected \"lru\", \"s3fifo\" or \"tinylfu\""
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_bad_names_are_refused() {
        for p in [Policy::Lru, Policy::S3Fifo, Policy::TinyLfu] {
            assert_eq!(p.name().parse::<Policy>(), Ok(p));
        }
        assert_eq!(Policy::default(), Policy::Lru);
        assert_eq!(Policy::default_for(1), Policy::Lru);
        assert_eq!(Policy::default_for(16), Policy::TinyLfu);
        let err = "LRU".parse::<Policy>().unwrap_err();
        assert!(err.contains("\"LRU\"") && err.contains("tinylfu"), "{err}");
        assert!("".parse::<Policy>().is_err());
    }
}
