//! Cache-key rules: the memcached-safety check that Django's `validate_key` applies, done on the
//! made key's bytes instead of a Python loop per character.

/// Memcached's key length limit, as Django's `MEMCACHE_MAX_KEY_LENGTH`.
const MEMCACHE_MAX_KEY_LENGTH: usize = 250;
/// Whether Django's `memcache_key_warnings` would warn about `key`: longer than 250 characters,
/// or holding a control character or space (`\x00`-`\x20`, `\x7f`).
pub fn needs_warning(key: &str) -> bool {
    let b = key.as_bytes();
    (b.len() > MEMCACHE_MAX_KEY_LENGTH && key.chars().count() > MEMCACHE_MAX_KEY_LENGTH)
        || b.iter().any(|&c| c <= 0x20 || c == 0x7f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warning_rules_match_django() {
        assert!(!needs_warning("prefix:1:plain-key_ok"));
        assert!(needs_warning("has space"));
        assert!(needs_warning("tab\there"));
        assert!(needs_warning("del\x7f"));
        assert!(needs_warning("nul\0"));
        assert!(!needs_warning(&"a".repeat(250)));
        assert!(needs_warning(&"a".repeat(251)));
        // 250 characters of two bytes each: long in bytes, not in characters.
        assert!(!needs_warning(&"é".repeat(250)));
        assert!(needs_warning(&"é".repeat(251)));
        assert!(!needs_warning("ключ"));
    }
}
