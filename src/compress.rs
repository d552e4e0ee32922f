//! Compressed values for NearCache (`OPTIONS["COMPRESS"]`): self-describing frames, and a
//! decompression that is bounded before it allocates.
//!
//! A frame is a 5-byte marker naming the codec, then the codec's own data:
//!
//! * [`ZSTD_MAGIC`] + one zstd frame (libzstd, level [`ZSTD_LEVEL`]) that declares its content
//!   size (libzstd writes it whenever the input is given whole, as here);
//! * [`LZ4_MAGIC`] + the content size (u32, little-endian) + one LZ4 block (`lz4_flex`).
//!
//! Both markers start with a NUL, as NearCache's other markers do (never an int's digits, nor a
//! pickle's first byte), so a reader tells a compressed value by its first bytes, whatever its
//! own `COMPRESS` setting. [`decompress`] reads the declared size first and refuses one above
//! the caller's bound before allocating anything; the output buffer is exactly that size, so a
//! frame that would inflate past it (or fall short of it) is an error too: a small value can
//! never make the process allocate more than the bound.
//!
//! The compression contexts are per thread (a zstd context is worth keeping: its tables are
//! hundreds of KB), used by one call at a time, never shared.

use std::cell::RefCell;
use std::fmt;

/// A zstd frame follows.
pub const ZSTD_MAGIC: &[u8; 5] = b"\x00rcz1";
/// The content size (u32 LE) and an LZ4 block follow.
pub const LZ4_MAGIC: &[u8; 5] = b"\x00rcl1";
/// zstd's own default level: on the benchmark's pickles it compresses as fast as level 1 (within
/// the noise) for a smaller result.
pub const ZSTD_LEVEL: i32 = 3;
const MAGIC_LEN: usize = 5;
/// LZ4 blocks carry no size: the frame's u32 does.
const LZ4_SIZE_LEN: usize = 4;

/// The codecs a frame may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    Zstd,
    Lz4,
}

impl Codec {
    /// The codec named `name` (`"zstd"` or `"lz4"`), as `OPTIONS["COMPRESS"]` names it.
    pub fn from_name(name: &str) -> Option<Codec> {
        match name {
            "zstd" => Some(Codec::Zstd),
            "lz4" => Some(Codec::Lz4),
            _ => None,
        }
    }

    /// The codec of `frame`, by its marker.
    pub fn of_frame(frame: &[u8]) -> Option<Codec> {
        match frame.get(..MAGIC_LEN) {
            Some(m) if m == ZSTD_MAGIC => Some(Codec::Zstd),
            Some(m) if m == LZ4_MAGIC => Some(Codec::Lz4),
            _ => None,
        }
    }
}

/// Why a frame cannot be decompressed.
#[derive(Debug, PartialEq, Eq)]
pub enum Error {
    /// No known marker in front.
    NotAFrame,
    /// The declared content size is above the caller's bound.
    TooLarge { declared: u64, max: usize },
    /// A truncated, corrupt or inconsistent frame (what the codec said, or what we checked).
    Malformed(String),
    /// The input is too large for the codec (LZ4 frames hold at most 4 GiB - 1).
    TooLargeToCompress(usize),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NotAFrame => f.write_str("not a compressed frame (unknown marker)"),
            Error::TooLarge { declared, max } => write!(
                f,
                "it declares {declared} bytes once decompressed, more than the limit of {max} \
                 (COMPRESS_MAX_SIZE)"
            ),
            Error::Malformed(why) => write!(f, "malformed compressed frame: {why}"),
            Error::TooLargeToCompress(n) => write!(f, "{n} bytes are too many for one frame"),
        }
    }
}

impl std::error::Error for Error {}

thread_local! {
    static ZSTD_C: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
    static ZSTD_D: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// `data` compressed with `codec`, as a frame (marker included).
pub fn compress(codec: Codec, data: &[u8]) -> Result<Vec<u8>, Error> {
    match codec {
        Codec::Zstd => {
            let mut out = vec![0u8; MAGIC_LEN + zstd::zstd_safe::compress_bound(data.len())];
            out[..MAGIC_LEN].copy_from_slice(ZSTD_MAGIC);
            let n = ZSTD_C.with(|cell| {
                let mut slot = cell.borrow_mut();
                if slot.is_none() {
                    *slot = Some(zstd::bulk::Compressor::new(ZSTD_LEVEL).map_err(malformed)?);
                }
                let c = slot.as_mut().expect("set above");
                c.compress_to_buffer(data, &mut out[MAGIC_LEN..])
                    .map_err(malformed)
            })?;
            out.truncate(MAGIC_LEN + n);
            Ok(out)
        }
        Codec::Lz4 => {
            let size =
                u32::try_from(data.len()).map_err(|_| Error::TooLargeToCompress(data.len()))?;
            let head = MAGIC_LEN + LZ4_SIZE_LEN;
            let mut out = vec![0u8; head + lz4_flex::block::get_maximum_output_size(data.len())];
            out[..MAGIC_LEN].copy_from_slice(LZ4_MAGIC);
            out[MAGIC_LEN..head].copy_from_slice(&size.to_le_bytes());
            let n = lz4_flex::block::compress_into(data, &mut out[head..])
                .map_err(|e| Error::Malformed(e.to_string()))?;
            out.truncate(head + n);
            Ok(out)
        }
    }
}

fn malformed(e: impl fmt::Display) -> Error {
    Error::Malformed(e.to_string())
}

/// The content size `frame` declares, if it is at most `max` (nothing is allocated).
pub fn declared_size(frame: &[u8], max: usize) -> Result<usize, Error> {
    let codec = Codec::of_frame(frame).ok_or(Error::NotAFrame)?;
    let body = &frame[MAGIC_LEN..];
    let declared: u64 = match codec {
        Codec::Zstd => {
            match zstd::zstd_safe::get_frame_content_size(body) {
                Ok(Some(n)) => {
                    // One frame exactly: nothing (not even a skippable frame) after it.
                    let len = zstd::zstd_safe::find_frame_compressed_size(body)
                        .map_err(|code| malformed(zstd::zstd_safe::get_error_name(code)))?;
                    if len != body.len() {
                        return Err(Error::Malformed(format!(
                            "{} bytes after the zstd frame",
                            body.len().saturating_sub(len)
                        )));
                    }
                    n
                }
                Ok(None) => return Err(malformed("the zstd frame does not declare its size")),
                Err(_) => return Err(malformed("not a zstd frame")),
            }
        }
        Codec::Lz4 => {
            let size = body
                .get(..LZ4_SIZE_LEN)
                .ok_or_else(|| malformed("truncated LZ4 size"))?;
            u64::from(u32::from_le_bytes(size.try_into().expect("4 bytes")))
        }
    };
    match usize::try_from(declared) {
        Ok(n) if n <= max => Ok(n),
        _ => Err(Error::TooLarge { declared, max }),
    }
}

/// Decompress `frame` into `out`, whose length must be the frame's declared size (see
/// [`declared_size`]): an error unless the frame fills `out` exactly.
pub fn decompress_into(frame: &[u8], out: &mut [u8]) -> Result<(), Error> {
    let codec = Codec::of_frame(frame).ok_or(Error::NotAFrame)?;
    let body = &frame[MAGIC_LEN..];
    let n = match codec {
        Codec::Zstd => ZSTD_D.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.is_none() {
                *slot = Some(zstd::bulk::Decompressor::new().map_err(malformed)?);
            }
            let d = slot.as_mut().expect("set above");
            d.decompress_to_buffer(body, out).map_err(malformed)
        })?,
        Codec::Lz4 => {
            let block = body
                .get(LZ4_SIZE_LEN..)
                .ok_or_else(|| malformed("truncated LZ4 size"))?;
            lz4_flex::block::decompress_into(block, out).map_err(malformed)?
        }
    };
    if n != out.len() {
        return Err(Error::Malformed(format!(
            "it inflates to {n} bytes, not the {} it declares",
            out.len()
        )));
    }
    Ok(())
}

/// `frame` decompressed, refused (before any allocation) if it declares more than `max` bytes.
pub fn decompress(frame: &[u8], max: usize) -> Result<Vec<u8>, Error> {
    let n = declared_size(frame, max)?;
    let mut out = vec![0u8; n];
    decompress_into(frame, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: usize) -> Vec<u8> {
        // Compressible but not trivial: words from a small vocabulary, in a varying order.
        let words: [&[u8]; 6] = [
            b"apple ",
            b"cherry ",
            b"<p class='x'>",
            b"price ",
            b"42 ",
            b"\n",
        ];
        let mut out = Vec::with_capacity(n + 16);
        let mut state = 7u32;
        while out.len() < n {
            state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            out.extend_from_slice(words[(state >> 16) as usize % words.len()]);
        }
        out.truncate(n);
        out
    }

    #[test]
    fn round_trips_with_each_codec() {
        for codec in [Codec::Zstd, Codec::Lz4] {
            for n in [0, 1, 100, 20_000, 300_000] {
                let data = sample(n);
                let frame = compress(codec, &data).unwrap();
                assert_eq!(Codec::of_frame(&frame), Some(codec));
                if n >= 20_000 {
                    assert!(
                        frame.len() < data.len() / 2,
                        "{codec:?} {n}: {}",
                        frame.len()
                    );
                }
                assert_eq!(declared_size(&frame, n).unwrap(), n);
                assert_eq!(decompress(&frame, n).unwrap(), data);
            }
        }
    }

    #[test]
    fn a_frame_declaring_more_than_the_bound_is_refused_before_allocating() {
        for codec in [Codec::Zstd, Codec::Lz4] {
            let frame = compress(codec, &sample(10_000)).unwrap();
            assert_eq!(
                decompress(&frame, 9_999),
                Err(Error::TooLarge {
                    declared: 10_000,
                    max: 9_999
                })
            );
        }
        // An LZ4 frame of 9 bytes declaring 4 GiB - 1.
        let mut bomb = LZ4_MAGIC.to_vec();
        bomb.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decompress(&bomb, 1 << 20),
            Err(Error::TooLarge { declared, .. }) if declared == u64::from(u32::MAX)
        ));
    }

    #[test]
    fn a_frame_that_inflates_past_what_it_declares_is_an_error() {
        // A real frame of 100 KB whose declared size is rewritten to 1 KB: the output buffer is
        // 1 KB, and the decoder stops at its end.
        let data = sample(100_000);
        let mut lz = compress(Codec::Lz4, &data).unwrap();
        lz[MAGIC_LEN..MAGIC_LEN + 4].copy_from_slice(&1000u32.to_le_bytes());
        assert_eq!(declared_size(&lz, 1 << 20), Ok(1000));
        assert!(matches!(decompress(&lz, 1 << 20), Err(Error::Malformed(_))));
        // Declaring more than the content is an error too.
        let mut lz = compress(Codec::Lz4, &data).unwrap();
        lz[MAGIC_LEN..MAGIC_LEN + 4].copy_from_slice(&200_000u32.to_le_bytes());
        assert!(matches!(decompress(&lz, 1 << 20), Err(Error::Malformed(_))));
        // zstd: the frame header's content size, rewritten (FCS field of 4 bytes for 100 KB).
        let zs = compress(Codec::Zstd, &data).unwrap();
        let fcs = (100_000u32).to_le_bytes();
        let at = zs.windows(4).position(|w| w == fcs).expect("the FCS field");
        let mut forged = zs.clone();
        forged[at..at + 4].copy_from_slice(&1000u32.to_le_bytes());
        assert!(matches!(
            decompress(&forged, 1 << 20),
            Err(Error::Malformed(_))
        ));
    }

    #[test]
    fn malformed_frames_are_errors_not_panics() {
        let data = sample(50_000);
        for codec in [Codec::Zstd, Codec::Lz4] {
            let frame = compress(codec, &data).unwrap();
            // Truncations, and flipped bytes at every 97th position.
            for cut in [
                MAGIC_LEN,
                MAGIC_LEN + 1,
                MAGIC_LEN + 3,
                frame.len() / 2,
                frame.len() - 1,
            ] {
                assert!(
                    decompress(&frame[..cut], 1 << 20).is_err(),
                    "{codec:?} cut {cut}"
                );
            }
            for at in (MAGIC_LEN..frame.len()).step_by(97) {
                let mut bad = frame.clone();
                bad[at] ^= 0x5A;
                // Either refused or (a flip inside a literal) some other 50,000 bytes: never a
                // panic, never more than declared.
                if let Ok(out) = decompress(&bad, 1 << 20) {
                    assert_eq!(out.len(), 50_000);
                }
            }
        }
        assert_eq!(decompress(b"", 10), Err(Error::NotAFrame));
        assert_eq!(decompress(b"\x00rcs1xxxx", 10), Err(Error::NotAFrame));
        // A zstd frame without a declared size (streamed), and two frames in a row.
        let mut streamed = ZSTD_MAGIC.to_vec();
        let mut enc = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
        std::io::Write::write_all(&mut enc, b"hello").unwrap();
        streamed.extend(enc.finish().unwrap());
        assert!(matches!(
            decompress(&streamed, 100),
            Err(Error::Malformed(ref m)) if m.contains("does not declare")
        ));
        let one = compress(Codec::Zstd, b"hello").unwrap();
        let mut two = one.clone();
        two.extend_from_slice(&one[MAGIC_LEN..]);
        assert!(matches!(decompress(&two, 100), Err(Error::Malformed(_))));
    }

    #[test]
    fn codec_names_and_markers() {
        assert_eq!(Codec::from_name("zstd"), Some(Codec::Zstd));
        assert_eq!(Codec::from_name("lz4"), Some(Codec::Lz4));
        assert_eq!(Codec::from_name("zlib"), None);
        assert_eq!(Codec::of_frame(b"\x00rcz"), None);
        // Neither an int's digits nor a pickle's first byte; distinct from the other markers.
        for m in [ZSTD_MAGIC, LZ4_MAGIC] {
            assert_eq!(m[0], 0);
            assert_ne!(&m[..], b"\x00rcs1");
            assert_ne!(&m[..], b"\x00rct1");
        }
    }
}
