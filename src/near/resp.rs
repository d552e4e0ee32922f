//! RESP3 on bytes: a parser for what a server sends (every RESP3 type, RESP2's nulls, pushes and
//! attributes) and the encoding of commands. No I/O here: the listener feeds it what it read.
//!
//! `parse` takes the bytes received so far and returns one whole frame and its length, `None` if
//! the frame is not complete yet (read more and call again with the longer buffer), or an error
//! for bytes that are not RESP (the connection is then dropped). It never panics and never
//! allocates more than the input justifies: a declared length or count is checked against what is
//! there before anything is reserved, and nesting is bounded.

use std::fmt;

/// A value a server sent. Attributes (`|`) are read and dropped: they annotate the value that
/// follows them, which is what `parse` returns.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// `+`
    Simple(Vec<u8>),
    /// `-` (and the bulk error `!`)
    Error(Vec<u8>),
    /// `:`
    Int(i64),
    /// `$`
    Bulk(Vec<u8>),
    /// `_`, and RESP2's `$-1` and `*-1`
    Null,
    /// `#`
    Bool(bool),
    /// `,`
    Double(f64),
    /// `(`: the digits, as sent
    BigNumber(Vec<u8>),
    /// `=`: the three-letter format and the text
    Verbatim([u8; 3], Vec<u8>),
    /// `*`
    Array(Vec<Value>),
    /// `~`
    Set(Vec<Value>),
    /// `%`
    Map(Vec<(Value, Value)>),
    /// `>`: out-of-band data (invalidations, pub/sub messages)
    Push(Vec<Value>),
}

impl Value {
    /// The bytes of a simple string, bulk string or verbatim string.
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Value::Simple(b) | Value::Bulk(b) | Value::Verbatim(_, b) => Some(b),
            _ => None,
        }
    }
}

/// Bytes that are not RESP3.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProtocolError(pub String);

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "protocol error: {}", self.0)
    }
}

impl std::error::Error for ProtocolError {}

/// Nesting deeper than this is refused (a server never nests so deep; a stream that does is
/// broken or hostile, and recursion must stay bounded).
pub const MAX_DEPTH: usize = 32;

/// The longest string accepted: Redis's own `proto-max-bulk-len` default.
pub const MAX_BULK: usize = 512 * 1024 * 1024;

type Parsed<T> = Result<Option<(T, usize)>, ProtocolError>;

fn err<T>(msg: impl Into<String>) -> Result<T, ProtocolError> {
    Err(ProtocolError(msg.into()))
}

/// Parses one frame from the start of `buf`: `Ok(Some((value, used)))`, `Ok(None)` if `buf` holds
/// only part of it, or an error.
pub fn parse(buf: &[u8]) -> Parsed<Value> {
    parse_at(buf, 0, 0)
}

/// The line starting at `at` (without its CRLF) and the position after the CRLF.
fn line(buf: &[u8], at: usize) -> Parsed<&[u8]> {
    let rest = &buf[at.min(buf.len())..];
    match rest.iter().position(|&b| b == b'\r') {
        Some(i) if i + 1 < rest.len() => {
            if rest[i + 1] == b'\n' {
                Ok(Some((&rest[..i], at + i + 2)))
            } else {
                err("CR not followed by LF")
            }
        }
        // A CR at the very end: the LF may still come.
        Some(_) => Ok(None),
        None if rest.contains(&b'\n') => err("LF without CR"),
        None => Ok(None),
    }
}

fn int(text: &[u8]) -> Result<i64, ProtocolError> {
    let s = std::str::from_utf8(text).or_else(|_| err("a number that is not ASCII"))?;
    let digits = s.strip_prefix(['-', '+']).unwrap_or(s);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return err(format!("bad integer {s:?}"));
    }
    s.parse::<i64>()
        .or_else(|_| err(format!("integer out of range {s:?}")))
}

/// A length or count: -1 gives `None` (a RESP2 null), anything else negative is an error.
fn length(text: &[u8]) -> Result<Option<usize>, ProtocolError> {
    match int(text)? {
        -1 => Ok(None),
        n if n < 0 => err(format!("negative length {n}")),
        n => usize::try_from(n)
            .map(Some)
            .or_else(|_| err("length too large")),
    }
}

/// `n` bytes of payload at `at`, followed by CRLF.
fn payload(buf: &[u8], at: usize, n: usize) -> Parsed<Vec<u8>> {
    if n > MAX_BULK {
        return err(format!("a string of {n} bytes"));
    }
    let end = match at.checked_add(n) {
        Some(e) => e,
        None => return err("length too large"),
    };
    if buf.len() < end + 2 {
        return Ok(None);
    }
    if &buf[end..end + 2] != b"\r\n" {
        return err("a string not followed by CRLF");
    }
    Ok(Some((buf[at..end].to_vec(), end + 2)))
}

fn parse_at(buf: &[u8], at: usize, depth: usize) -> Parsed<Value> {
    if depth > MAX_DEPTH {
        return err("nesting too deep");
    }
    let Some(&kind) = buf.get(at) else {
        return Ok(None);
    };
    let Some((head, next)) = line(buf, at + 1)? else {
        return Ok(None);
    };
    let simple = |v: Value| Ok(Some((v, next)));
    match kind {
        b'+' => simple(Value::Simple(head.to_vec())),
        b'-' => simple(Value::Error(head.to_vec())),
        b':' => simple(Value::Int(int(head)?)),
        b'_' if head.is_empty() => simple(Value::Null),
        b'_' => err("null with a payload"),
        b'#' => match head {
            b"t" => simple(Value::Bool(true)),
            b"f" => simple(Value::Bool(false)),
            _ => err("bad boolean"),
        },
        b',' => {
            let s = std::str::from_utf8(head).or_else(|_| err("a double that is not ASCII"))?;
            match s.parse::<f64>() {
                Ok(d) if !s.is_empty() => simple(Value::Double(d)),
                _ => err(format!("bad double {s:?}")),
            }
        }
        b'(' => {
            let digits = head.strip_prefix(b"-").unwrap_or(head);
            let digits = digits.strip_prefix(b"+").unwrap_or(digits);
            if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
                return err("bad big number");
            }
            simple(Value::BigNumber(head.to_vec()))
        }
        b'$' | b'!' | b'=' => {
            if head == b"?" {
                return err("streamed strings are not supported");
            }
            let Some(n) = length(head)? else {
                return if kind == b'$' {
                    simple(Value::Null)
                } else {
                    err("null length for a non-bulk string")
                };
            };
            let Some((bytes, end)) = payload(buf, next, n)? else {
                return Ok(None);
            };
            let v = match kind {
                b'$' => Value::Bulk(bytes),
                b'!' => Value::Error(bytes),
                _ => {
                    if bytes.len() < 4 || bytes[3] != b':' {
                        return err("verbatim string without a format");
                    }
                    Value::Verbatim([bytes[0], bytes[1], bytes[2]], bytes[4..].to_vec())
                }
            };
            Ok(Some((v, end)))
        }
        b'*' | b'~' | b'>' | b'%' | b'|' => {
            if head == b"?" {
                return err("streamed aggregates are not supported");
            }
            let Some(n) = length(head)? else {
                return if kind == b'*' {
                    simple(Value::Null)
                } else {
                    err("null length for an aggregate other than an array")
                };
            };
            if n > MAX_BULK {
                return err(format!("an aggregate of {n} elements"));
            }
            let pairs = matches!(kind, b'%' | b'|');
            let items = if pairs { n * 2 } else { n };
            // Every element takes at least 3 bytes: reserve no more than the input can hold.
            let mut out = Vec::with_capacity(items.min(buf.len().saturating_sub(next) / 3));
            let mut pos = next;
            for _ in 0..items {
                match parse_at(buf, pos, depth + 1)? {
                    Some((v, end)) => {
                        out.push(v);
                        pos = end;
                    }
                    None => return Ok(None),
                }
            }
            let v = match kind {
                b'*' => Value::Array(out),
                b'~' => Value::Set(out),
                b'>' => Value::Push(out),
                _ => {
                    let mut map = Vec::with_capacity(out.len() / 2);
                    let mut it = out.into_iter();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        map.push((k, v));
                    }
                    if kind == b'|' {
                        // An attribute: the value it annotates follows; that is the frame.
                        return match parse_at(buf, pos, depth + 1)? {
                            Some((v, end)) => Ok(Some((v, end))),
                            None => Ok(None),
                        };
                    }
                    Value::Map(map)
                }
            };
            Ok(Some((v, pos)))
        }
        other => err(format!("unknown type byte 0x{other:02x}")),
    }
}

/// A command as a RESP array of bulk strings (what every server accepts).
pub fn encode(args: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + args.iter().map(|a| a.len() + 16).sum::<usize>());
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(bytes: &[u8]) -> Value {
        match parse(bytes) {
            Ok(Some((v, n))) => {
                assert_eq!(n, bytes.len(), "the whole frame is used");
                v
            }
            other => panic!("{bytes:?} gave {other:?}"),
        }
    }

    fn bad(bytes: &[u8]) {
        assert!(parse(bytes).is_err(), "{bytes:?} was accepted");
    }

    #[test]
    fn every_resp3_type_parses() {
        assert_eq!(one(b"+PONG\r\n"), Value::Simple(b"PONG".to_vec()));
        assert_eq!(one(b"-ERR no\r\n"), Value::Error(b"ERR no".to_vec()));
        assert_eq!(one(b"!5\r\nERR x\r\n"), Value::Error(b"ERR x".to_vec()));
        assert_eq!(one(b":-42\r\n"), Value::Int(-42));
        assert_eq!(one(b":+7\r\n"), Value::Int(7));
        assert_eq!(one(b"$3\r\na\r\n\r\n"), Value::Bulk(b"a\r\n".to_vec()));
        assert_eq!(one(b"$0\r\n\r\n"), Value::Bulk(Vec::new()));
        assert_eq!(one(b"_\r\n"), Value::Null);
        assert_eq!(one(b"$-1\r\n"), Value::Null);
        assert_eq!(one(b"*-1\r\n"), Value::Null);
        assert_eq!(one(b"#t\r\n"), Value::Bool(true));
        assert_eq!(one(b"#f\r\n"), Value::Bool(false));
        assert_eq!(one(b",1.5e3\r\n"), Value::Double(1500.0));
        assert_eq!(one(b",-inf\r\n"), Value::Double(f64::NEG_INFINITY));
        assert!(matches!(one(b",nan\r\n"), Value::Double(d) if d.is_nan()));
        assert_eq!(
            one(b"(3492890328409238509324850943850943825024385\r\n"),
            Value::BigNumber(b"3492890328409238509324850943850943825024385".to_vec())
        );
        assert_eq!(
            one(b"=15\r\ntxt:Some string\r\n"),
            Value::Verbatim(*b"txt", b"Some string".to_vec())
        );
        assert_eq!(
            one(b"*2\r\n:1\r\n$1\r\nx\r\n"),
            Value::Array(vec![Value::Int(1), Value::Bulk(b"x".to_vec())])
        );
        assert_eq!(one(b"~1\r\n#t\r\n"), Value::Set(vec![Value::Bool(true)]));
        assert_eq!(
            one(b"%1\r\n+a\r\n:1\r\n"),
            Value::Map(vec![(Value::Simple(b"a".to_vec()), Value::Int(1))])
        );
        assert_eq!(one(b"*0\r\n"), Value::Array(Vec::new()));
    }

    #[test]
    fn invalidation_pushes_parse_with_keys_or_null() {
        let keys = b">2\r\n$10\r\ninvalidate\r\n*2\r\n$6\r\np:1:ab\r\n$6\r\np:1:cd\r\n";
        assert_eq!(
            one(keys),
            Value::Push(vec![
                Value::Bulk(b"invalidate".to_vec()),
                Value::Array(vec![
                    Value::Bulk(b"p:1:ab".to_vec()),
                    Value::Bulk(b"p:1:cd".to_vec())
                ]),
            ])
        );
        assert_eq!(
            one(b">2\r\n$10\r\ninvalidate\r\n_\r\n"),
            Value::Push(vec![Value::Bulk(b"invalidate".to_vec()), Value::Null])
        );
    }

    #[test]
    fn an_attribute_is_dropped_and_the_value_it_annotates_returned() {
        let bytes = b"|1\r\n+key-popularity\r\n%1\r\n$1\r\na\r\n,0.19\r\n*1\r\n:2\r\n";
        assert_eq!(one(bytes), Value::Array(vec![Value::Int(2)]));
        // An attribute inside an aggregate annotates the element after it.
        assert_eq!(
            one(b"*1\r\n|1\r\n+a\r\n+b\r\n:5\r\n"),
            Value::Array(vec![Value::Int(5)])
        );
    }

    #[test]
    fn partial_input_asks_for_more_at_every_cut_and_then_parses() {
        let frames: &[&[u8]] = &[
            b">2\r\n$10\r\ninvalidate\r\n*2\r\n$6\r\np:1:ab\r\n$6\r\np:1:cd\r\n",
            b"%2\r\n$6\r\nserver\r\n$5\r\nredis\r\n$5\r\nproto\r\n:3\r\n",
            b"=15\r\ntxt:Some string\r\n",
            b"|1\r\n+a\r\n+b\r\n(12345\r\n",
            b"+PONG\r\n",
        ];
        for f in frames {
            let whole = one(f);
            for cut in 0..f.len() {
                assert_eq!(parse(&f[..cut]), Ok(None), "{f:?} cut at {cut}");
            }
            // Two frames back to back: the first is returned with its own length.
            let mut two = f.to_vec();
            two.extend_from_slice(f);
            assert_eq!(parse(&two), Ok(Some((whole, f.len()))));
        }
    }

    #[test]
    fn malformed_input_is_an_error_never_a_panic() {
        bad(b"?x\r\n");
        bad(b":12a\r\n");
        bad(b":\r\n");
        bad(b":99999999999999999999\r\n");
        bad(b"$-2\r\n");
        bad(b"$3\r\nabcd\r\n");
        bad(b"$x\r\n");
        bad(b"+a\rb\r\n");
        bad(b"+a\n");
        bad(b"#x\r\n");
        bad(b",\r\n");
        bad(b",1.2.3\r\n");
        bad(b"(12a\r\n");
        bad(b"(\r\n");
        bad(b"=3\r\ntxt\r\n");
        bad(b"=5\r\ntxt-a\r\n");
        bad(b"_x\r\n");
        bad(b"%-1\r\n");
        bad(b"!-1\r\n");
        bad(b"$?\r\n");
        bad(b"*?\r\n");
        bad(b"*1\r\n:x\r\n");
        bad(b"$9223372036854775807\r\n");
        bad(b"*9223372036854775807\r\n:1\r\n");
        bad(b"%9223372036854775807\r\n");
        // Deep nesting is refused, not recursed into.
        let deep: Vec<u8> = b"*1\r\n".repeat(10_000);
        bad(&deep);
    }

    #[test]
    fn a_huge_declared_count_reserves_nothing_before_the_elements_come() {
        // Accepted as "incomplete" without allocating for the declared count.
        assert_eq!(parse(b"*100000000\r\n:1\r\n"), Ok(None));
        assert_eq!(parse(b"$536870912\r\nabc"), Ok(None));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic fuzz: every prefix of mutated frames.
        let seed: &[u8] = b">2\r\n$10\r\ninvalidate\r\n*1\r\n$6\r\np:1:ab\r\n%1\r\n+a\r\n,1.5\r\n";
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut b = seed.to_vec();
            let i = (x as usize) % b.len();
            b[i] = (x >> 32) as u8;
            let _ = parse(&b[..(x >> 40) as usize % (b.len() + 1)]);
        }
    }

    #[test]
    fn commands_encode_as_arrays_of_bulk_strings() {
        assert_eq!(encode(&[b"PING"]), b"*1\r\n$4\r\nPING\r\n".to_vec());
        let cmd = encode(&[b"CLIENT", b"TRACKING", b"on", b"a\r\nb"]);
        assert_eq!(
            parse(&cmd).unwrap().unwrap().0,
            Value::Array(vec![
                Value::Bulk(b"CLIENT".to_vec()),
                Value::Bulk(b"TRACKING".to_vec()),
                Value::Bulk(b"on".to_vec()),
                Value::Bulk(b"a\r\nb".to_vec()),
            ])
        );
    }
}
