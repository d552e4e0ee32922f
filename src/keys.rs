//! Cache-key rules: the memcached-safety check that Django's `validate_key` applies, done on the
//! made key's bytes instead of a Python loop per character; and the store's text for made keys
//! that a Rust `str` cannot hold as they are.
//!
//! A Python str may hold lone surrogates (U+D800-U+DFFF), which UTF-8 cannot. The store keeps
//! such a key as text in which each lone surrogate and each U+FFFF (the escape character, a
//! noncharacter) becomes U+FFFF followed by the code point's 4 lowercase hex digits. Because the
//! escape character itself is always escaped, distinct keys give distinct texts, and
//! `unescape_to_utf8` gives the caller's key back. A key with neither (nearly every key) is its
//! own text: the fast path only has to notice that no U+FFFF is there, in the same pass over the
//! bytes as the warning check.

/// Memcached's key length limit, as Django's `MEMCACHE_MAX_KEY_LENGTH`.
const MEMCACHE_MAX_KEY_LENGTH: usize = 250;
/// Whether Django's `memcache_key_warnings` would warn about `key`: longer than 250 characters,
/// or holding a control character or space (`\x00`-`\x20`, `\x7f`).
pub fn needs_warning(key: &str) -> bool {
    let b = key.as_bytes();
    (b.len() > MEMCACHE_MAX_KEY_LENGTH && key.chars().count() > MEMCACHE_MAX_KEY_LENGTH)
        || b.iter().any(|&c| c <= 0x20 || c == 0x7f)
}

/// The escape character of store text (see the module docs).
pub const ESC: char = '\u{ffff}';

/// What a made key built from text needs before it can be used as store text.
#[derive(Debug, PartialEq, Eq)]
pub enum Check {
    /// Nothing: it is its own store text and Django would not warn.
    Clean,
    /// Django's memcached-safety warning.
    Warn,
    /// It holds U+FFFF, which must be escaped (and the warning judged on the caller's text).
    Escape,
}

/// One pass over `key`'s bytes for both `needs_warning` and the escape character (whose UTF-8
/// form starts with 0xEF); only a key that has such a byte is looked at again. The pass is a
/// fold without early exit, which the compiler vectorizes: about twice as fast on a 30-byte key
/// as the short-circuiting scan `needs_warning` does.
pub fn check(key: &str) -> Check {
    let b = key.as_bytes();
    let suspect = (b.len() > MEMCACHE_MAX_KEY_LENGTH
        && key.chars().count() > MEMCACHE_MAX_KEY_LENGTH)
        || b.iter().fold(false, |seen, &c| {
            seen | (c <= 0x20) | (c == 0x7f) | (c == 0xef)
        });
    if !suspect {
        Check::Clean
    } else if key.contains(ESC) {
        Check::Escape
    } else if needs_warning(key) {
        Check::Warn
    } else {
        Check::Clean
    }
}

/// Appends the store text of one code point: as is, or escaped when it is a lone surrogate or
/// U+FFFF. (Every u32 that is not a char and not a surrogate is beyond U+10FFFF: escaped too, with
/// as many hex digits as it takes, so that nothing panics; Python never hands one over.)
pub fn push_code_point(out: &mut String, cp: u32) {
    match char::from_u32(cp) {
        Some(c) if c != ESC => out.push(c),
        _ => {
            use std::fmt::Write;
            out.push(ESC);
            let _ = write!(out, "{cp:04x}");
        }
    }
}

/// The caller's text of store text, as UTF-8 with lone surrogates encoded as their 3 bytes
/// (what Python's `bytes.decode("utf-8", "surrogatepass")` reads back).
pub fn unescape_to_utf8(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(ESC) {
        out.extend_from_slice(&rest.as_bytes()[..at]);
        let after = &rest[at + ESC.len_utf8()..];
        let cp = after
            .get(..4)
            .and_then(|hex| u32::from_str_radix(hex, 16).ok());
        match cp {
            Some(cp) => {
                // Three bytes, as UTF-8 encodes any code point of U+0800-U+FFFF.
                out.extend_from_slice(&[
                    0xe0 | (cp >> 12) as u8,
                    0x80 | ((cp >> 6) & 0x3f) as u8,
                    0x80 | (cp & 0x3f) as u8,
                ]);
                rest = &after[4..];
            }
            None => {
                // Not store text made by `push_code_point`: keep the character as it is.
                out.extend_from_slice(ESC.to_string().as_bytes());
                rest = after;
            }
        }
    }
    out.extend_from_slice(rest.as_bytes());
    out
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

    fn escape(cps: &[u32]) -> String {
        let mut out = String::new();
        for &cp in cps {
            push_code_point(&mut out, cp);
        }
        out
    }

    #[test]
    fn check_agrees_with_needs_warning_and_finds_the_escape_character() {
        for key in ["p:1:k", "has space", "ключ", "ｆｕｌｌ", "\u{fffe}"] {
            let expected = if needs_warning(key) {
                Check::Warn
            } else {
                Check::Clean
            };
            assert_eq!(check(key), expected, "{key:?}");
        }
        assert_eq!(check(&"a".repeat(251)), Check::Warn);
        assert_eq!(check("p:1:\u{ffff}"), Check::Escape);
        assert_eq!(check("p:1: \u{ffff}"), Check::Escape);
    }

    #[test]
    fn surrogates_and_the_escape_character_are_escaped_and_come_back() {
        assert_eq!(escape(&[0x61, 0xdc80, 0x62]), "a\u{ffff}dc80b");
        assert_eq!(escape(&[0xffff]), "\u{ffff}ffff");
        assert_eq!(escape(&[0x10ffff, 0xfffe]), "\u{10ffff}\u{fffe}");
        assert_eq!(unescape_to_utf8("a\u{ffff}dc80b"), b"a\xed\xb2\x80b");
        assert_eq!(unescape_to_utf8("\u{ffff}ffff"), "\u{ffff}".as_bytes());
        assert_eq!(unescape_to_utf8("plain ключ"), "plain ключ".as_bytes());
        // Not made by the escape: left as it is rather than panicking.
        assert_eq!(unescape_to_utf8("x\u{ffff}zz"), "x\u{ffff}zz".as_bytes());
        assert_eq!(unescape_to_utf8("\u{ffff}"), "\u{ffff}".as_bytes());
    }

    #[test]
    fn distinct_code_point_strings_have_distinct_texts() {
        let alphabet = [0x61, 0x66, 0x30, 0xd800, 0xdc80, 0xdfff, 0xffff, 0xfffe];
        let mut seen = std::collections::HashMap::new();
        // Every string of up to 4 code points from the alphabet.
        let mut strings: Vec<Vec<u32>> = vec![vec![]];
        for _ in 0..4 {
            let longer: Vec<Vec<u32>> = strings
                .iter()
                .filter(|s| s.len() == strings.last().map_or(0, Vec::len))
                .flat_map(|s| {
                    alphabet.iter().map(move |&c| {
                        let mut t = s.clone();
                        t.push(c);
                        t
                    })
                })
                .collect();
            strings.extend(longer);
        }
        for s in strings {
            let text = escape(&s);
            let utf8: Vec<u8> = s
                .iter()
                .flat_map(|&cp| match cp {
                    0..0x80 => vec![cp as u8],
                    _ => vec![
                        0xe0 | (cp >> 12) as u8,
                        0x80 | ((cp >> 6) & 0x3f) as u8,
                        0x80 | (cp & 0x3f) as u8,
                    ],
                })
                .collect();
            assert_eq!(unescape_to_utf8(&text), utf8, "{s:x?}");
            if let Some(other) = seen.insert(text.clone(), s.clone()) {
                panic!("{s:x?} and {other:x?} both give {text:?}");
            }
        }
    }
}
