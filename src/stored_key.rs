//! How an entry keeps its key. Django's default made key is `KEY_PREFIX:VERSION:key`, and with
//! the defaults (KEY_PREFIX "" and VERSION 1, by far the commonest) every made key starts with
//! `:1:`. An entry's block (see `entry.rs`) keeps such a key without those three bytes and one
//! bit that says so: 3 bytes an entry, which for the common shape of a small value decide its
//! malloc chunk.
//!
//! `StoredKey` is that pair, standing for the whole key everywhere: it compares, hashes, tests a
//! prefix and prints as the text it stands for. The split is canonical (every key that starts
//! with `:1:` is kept elided, no other is), so two keys are equal exactly when their pairs are,
//! and the hash is defined on the pair: a lookup (which splits the caller's key) and a rehash
//! from a block (which reads the pair) hash alike, with no copy of the whole key.

use std::fmt;
use std::hash::{BuildHasher, Hash, Hasher};

/// The prefix an entry's block leaves out of its key.
pub const ELIDED: &str = ":1:";

/// A key as an entry keeps it: whether `ELIDED` was left out, and the rest.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct StoredKey<'a> {
    elided: bool,
    rest: &'a str,
}

impl<'a> StoredKey<'a> {
    /// The stored form of `key` (the only way to make one from a whole key).
    #[inline]
    pub fn of(key: &'a str) -> Self {
        match key.strip_prefix(ELIDED) {
            Some(rest) => StoredKey { elided: true, rest },
            None => StoredKey {
                elided: false,
                rest: key,
            },
        }
    }

    /// The key an entry's block holds as `rest`, elided or not (as `of` split it).
    #[inline]
    pub(crate) fn from_parts(elided: bool, rest: &'a str) -> Self {
        debug_assert!(
            elided || !rest.starts_with(ELIDED),
            "not the canonical split"
        );
        StoredKey { elided, rest }
    }

    /// Whether the key's `ELIDED` prefix was left out.
    #[inline]
    pub fn is_elided(&self) -> bool {
        self.elided
    }

    /// The bytes an entry's block holds.
    #[inline]
    pub fn rest(&self) -> &'a str {
        self.rest
    }

    /// The whole key's length in bytes.
    #[inline]
    pub fn len(&self) -> usize {
        self.rest.len() + if self.elided { ELIDED.len() } else { 0 }
    }

    /// Whether the whole key is empty.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the whole key starts with `prefix`.
    pub fn starts_with(&self, prefix: &str) -> bool {
        if !self.elided {
            return self.rest.starts_with(prefix);
        }
        match prefix.strip_prefix(ELIDED) {
            Some(tail) => self.rest.starts_with(tail),
            // A prefix shorter than `ELIDED` (or one that does not begin with it).
            None => ELIDED.starts_with(prefix),
        }
    }

    /// The key's hash under `hasher`: the one hash of a key everywhere in the store.
    #[inline]
    pub fn hash_with(&self, hasher: &impl BuildHasher) -> u64 {
        hasher.hash_one(self)
    }
}

impl<'a> From<&'a str> for StoredKey<'a> {
    #[inline]
    fn from(key: &'a str) -> Self {
        StoredKey::of(key)
    }
}

impl<'a> From<&'a String> for StoredKey<'a> {
    #[inline]
    fn from(key: &'a String) -> Self {
        StoredKey::of(key)
    }
}

/// Defined on the pair (see the module docs): the rest's bytes, then a byte that differs with
/// the prefix (for a key that is not elided, the bytes `str`'s own hash writes).
impl Hash for StoredKey<'_> {
    #[inline]
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(self.rest.as_bytes());
        state.write_u8(if self.elided { 0xfe } else { 0xff });
    }
}

impl PartialEq<str> for StoredKey<'_> {
    #[inline]
    fn eq(&self, other: &str) -> bool {
        *self == StoredKey::of(other)
    }
}

impl PartialEq<&str> for StoredKey<'_> {
    #[inline]
    fn eq(&self, other: &&str) -> bool {
        *self == StoredKey::of(other)
    }
}

impl PartialEq<String> for StoredKey<'_> {
    #[inline]
    fn eq(&self, other: &String) -> bool {
        *self == StoredKey::of(other)
    }
}

impl fmt::Display for StoredKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.elided {
            f.write_str(ELIDED)?;
        }
        f.write_str(self.rest)
    }
}

impl fmt::Debug for StoredKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.to_string(), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ahash::RandomState;

    /// Keys that differ only around the elided prefix.
    const NEAR: [&str; 9] = [
        ":1:abc", "abc", ":10:abc", ":1:", "", ":1", ":", ":1:1:abc", "1:abc",
    ];

    #[test]
    fn keys_that_differ_only_by_the_prefix_stay_distinct_and_print_as_they_were() {
        let h = RandomState::with_seeds(1, 2, 3, 4);
        for a in NEAR {
            let ka = StoredKey::of(a);
            assert_eq!(ka.is_elided(), a.starts_with(":1:"), "{a:?}");
            assert_eq!(ka.to_string(), a);
            assert_eq!(format!("{ka:?}"), format!("{a:?}"));
            assert_eq!((ka.len(), ka.is_empty()), (a.len(), a.is_empty()));
            let owned = a.to_string();
            assert!(ka == a && ka == *a && ka == owned);
            for b in NEAR {
                let kb = StoredKey::of(b);
                assert_eq!(ka == kb, a == b, "{a:?} vs {b:?}");
                assert_eq!(ka == b, a == b, "{a:?} vs {b:?}");
                if a != b {
                    assert_ne!(ka.hash_with(&h), kb.hash_with(&h), "{a:?} vs {b:?}");
                }
                // Every prefix of every key, and these keys as prefixes.
                assert_eq!(
                    ka.starts_with(b),
                    a.starts_with(b),
                    "{a:?} starts with {b:?}"
                );
            }
            for i in 0..=a.len() {
                assert!(ka.starts_with(&a[..i]));
            }
        }
        assert_eq!(StoredKey::of(":1:abc").rest(), "abc");
        assert_eq!(StoredKey::of(":1:").rest(), "");
        assert_eq!(StoredKey::of(":10:abc").rest(), ":10:abc");
    }

    #[test]
    fn a_key_split_again_from_its_parts_is_the_same_key_with_the_same_hash() {
        let h = RandomState::new();
        for a in NEAR
            .iter()
            .copied()
            .chain([":1:user:123456:profile", ":1:é", "é"])
        {
            let k = StoredKey::of(a);
            let again = StoredKey::from_parts(k.is_elided(), k.rest());
            assert!(again == k);
            assert_eq!(again.hash_with(&h), StoredKey::of(a).hash_with(&h));
        }
    }
}
