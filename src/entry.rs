//! One heap block per entry: `[header][optional tail][key][payload]`, behind an 8-byte owning
//! pointer (`Entry`). The slab of a shard holds these pointers, so an entry of a small inline
//! value (Django's made key `:1:user:123456:profile` and a 100-byte payload) costs one 144-byte
//! malloc chunk and 8 bytes of slab, where a struct of fixed fields plus a separate key block
//! took 88 + 128 bytes.
//!
//! The 17-byte header holds what every entry needs: queue links, deadline (milliseconds), flags,
//! the S3-FIFO counter, the payload's length and a byte for the key: its length (up to
//! `SHORT_KEY`) and whether its `:1:` prefix was left out (`stored_key.rs`: the block keeps
//! `user:123456:profile` for `:1:user:123456:profile`). The tail holds only what this entry
//! needs, in this order: the value `V` (unless the value is nothing but a tag, see `Pack::tag`),
//! the tag stamps, a far deadline, the generation (with the stamps: only a tagged entry has one,
//! see `Entry::gen`), the compute time, a fixed charge and a long key's length. Which of them are present is in the flags, so the block's size and layout follow
//! from the header alone. A tail that holds a `V`, stamps or a far deadline starts at byte 24
//! (8-aligned); one of 4-byte fields only, at byte 20.
//!
//! The unsafe code of the crate's entries is all here: the block is written once in `build`, read
//! through offsets from `Shape`, and freed (dropping the tail's `V` and stamps) in `Drop`.

use std::alloc::{alloc, dealloc, handle_alloc_error, Layout};
use std::marker::PhantomData;
use std::mem::{align_of, size_of, ManuallyDrop};
use std::ptr::{self, NonNull};
use std::sync::atomic::AtomicU8;

use crate::clock::NEVER;
use crate::stored_key::StoredKey;
use crate::tags::{Stamps, TagStamp};

/// How a value lends itself to the entry's block.
pub trait Pack: Sized + 'static {
    /// Bytes the store should keep in the entry's block, after the key (at most
    /// `MAX_PAYLOAD`); the entry then keeps `without_payload()` as the value.
    fn payload(&self) -> &[u8] {
        &[]
    }

    /// 1 to 3 when, once its payload is in the block, the value is nothing but this tag (the
    /// entry keeps no `V` at all and `from_tag` stands for it); 0 when the entry keeps the value.
    /// The value `without_payload` makes of a tagged one must own nothing (the entry drops it,
    /// and dropping it must run no code).
    fn tag(&self) -> u8 {
        0
    }

    /// The value once the store holds its payload.
    fn without_payload(self) -> Self {
        self
    }

    /// The value that `tag` (1 to 3) stands for.
    fn from_tag(tag: u8) -> &'static Self;
}

/// Longest payload an entry holds in its block.
pub const MAX_PAYLOAD: usize = u16::MAX as usize;

/// Bytes of the header in use; the key follows directly when the entry has no tail.
pub const HEADER: usize = 17;

/// Where a tail of 4-byte fields only begins (past the header struct's 3 bytes of padding), and
/// the smallest block (so that the whole `Header` struct is always inside it).
const NARROW_TAIL: usize = 20;

/// Where a tail with a `V`, stamps or a far deadline begins (8-aligned).
const TAIL: usize = 24;

const NIL: u32 = u32::MAX;

// Flags.
const SMALL: u8 = 1;
const TAGS: u8 = 2;
const FAR: u8 = 4;
const DELTA: u8 = 8;
const WEIGHT: u8 = 16;
const LONG_KEY: u8 = 32;
const TAG_SHIFT: u32 = 6;

/// The header's key byte: the stored key's length when it is at most `SHORT_KEY` bytes (a longer
/// key's length is in the tail, `LONG_KEY`), and `KEY_ELIDED` when the key's `:1:` is left out.
const SHORT_KEY: usize = 0x7f;
const KEY_ELIDED: u8 = 0x80;

/// The deadline field's value for "never" (and for a far deadline, which the tail holds).
const NO_DEADLINE: u32 = u32::MAX;

#[repr(C)]
struct Header {
    prev: u32,
    next: u32,
    /// Milliseconds since the clock's epoch, rounded down (see `deadline_ms`).
    expires: u32,
    flags: u8,
    freq: AtomicU8,
    payload_len: u16,
    /// `SHORT_KEY` bits of length and `KEY_ELIDED`.
    key: u8,
}

const _: () =
    assert!(size_of::<Header>() == NARROW_TAIL && std::mem::offset_of!(Header, key) + 1 == HEADER);

/// The intrusive queue an entry is threaded on. The "lru" policy keeps everything on `Main`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Queue {
    Main = 0,
    Small = 1,
}

/// Offsets of the parts of a block with the given flags and lengths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Shape {
    v: usize,
    tags: usize,
    far: usize,
    gen: usize,
    delta: usize,
    weight: usize,
    long_key: usize,
    key: usize,
    size: usize,
    align: usize,
}

/// Offsets of a tail's parts and the key, and the block's alignment, for one value of the flags.
#[derive(Clone, Copy)]
struct Tail {
    v: u8,
    tags: u8,
    far: u8,
    gen: u8,
    delta: u8,
    weight: u8,
    long_key: u8,
    key: u8,
    align: u8,
}

/// The tail of an entry with `flags` whose value (if it keeps one) takes `v_size` bytes.
const fn tail(flags: u8, v_size: usize) -> Tail {
    let has_v = flags >> TAG_SHIFT == 0;
    let wide = has_v || flags & (TAGS | FAR) != 0;
    let any = wide || flags & (DELTA | WEIGHT | LONG_KEY) != 0;
    let mut off = if wide {
        TAIL
    } else if any {
        NARROW_TAIL
    } else {
        HEADER
    };
    let v = off;
    if has_v {
        off += v_size;
    }
    let tags = off;
    if flags & TAGS != 0 {
        off += size_of::<Stamps>();
    }
    let far = off;
    if flags & FAR != 0 {
        off += 8;
    }
    let gen = off;
    if flags & TAGS != 0 {
        off += 4;
    }
    let delta = off;
    if flags & DELTA != 0 {
        off += 4;
    }
    let weight = off;
    if flags & WEIGHT != 0 {
        off += 4;
    }
    let long_key = off;
    if flags & LONG_KEY != 0 {
        off += 4;
    }
    Tail {
        v: v as u8,
        tags: tags as u8,
        far: far as u8,
        gen: gen as u8,
        delta: delta as u8,
        weight: weight as u8,
        long_key: long_key as u8,
        key: off as u8,
        align: if wide { 8 } else { 4 },
    }
}

/// Every tail for values of type `V`, by flags: finding a part of an entry is one table load.
struct Tails<V>(PhantomData<V>);

impl<V> Tails<V> {
    const ALL: [Tail; 256] = {
        assert!(
            align_of::<V>() <= 8,
            "an entry's value is at most 8-aligned"
        );
        assert!(
            size_of::<V>() <= 128,
            "an entry's value is at most 128 bytes"
        );
        let v_size = size_of::<V>().next_multiple_of(8);
        let mut all = [tail(0, 0); 256];
        let mut flags = 0;
        while flags < 256 {
            all[flags] = tail(flags as u8, v_size);
            flags += 1;
        }
        all
    };
}

impl Shape {
    #[inline]
    fn of<V>(flags: u8, key_len: usize, payload_len: usize) -> Shape {
        let all: &'static [Tail; 256] = &Tails::<V>::ALL;
        let t = all[usize::from(flags)];
        let key = usize::from(t.key);
        Shape {
            v: usize::from(t.v),
            tags: usize::from(t.tags),
            far: usize::from(t.far),
            gen: usize::from(t.gen),
            delta: usize::from(t.delta),
            weight: usize::from(t.weight),
            long_key: usize::from(t.long_key),
            key,
            size: (key + key_len + payload_len).max(NARROW_TAIL),
            align: usize::from(t.align),
        }
    }

    fn layout(&self) -> Layout {
        Layout::from_size_align(self.size, self.align).expect("an entry's block fits in memory")
    }
}

/// The deadline `ns` as the header keeps it: milliseconds, rounded down (as with LocMemCache, an
/// entry is gone once its timeout has passed; it may go up to a millisecond early, never late),
/// or `None` when it needs the tail's 8 bytes
/// (later than 49.7 days after the clock's epoch). `NEVER` is `NO_DEADLINE`.
#[inline]
fn deadline_ms(ns: u64) -> Option<u32> {
    if ns == NEVER {
        return Some(NO_DEADLINE);
    }
    let ms = ns / 1_000_000;
    (ms < u64::from(NO_DEADLINE)).then_some(ms as u32)
}

/// The deadline an entry stored with deadline `ns` reports (`Entry::expires`).
#[inline]
pub fn rounded_deadline(ns: u64) -> u64 {
    match deadline_ms(ns) {
        Some(NO_DEADLINE) => NEVER,
        Some(ms) => u64::from(ms) * 1_000_000,
        None => ns,
    }
}

/// The size of the block `Entry::new` allocates for `key` and `value`, with stamps or not and
/// deadline `expires`, once a compute time of `delta_ns` (0: none) is recorded.
pub fn planned_size<V: Pack>(
    key: &str,
    value: &V,
    tagged: bool,
    expires: u64,
    delta_ns: u64,
) -> usize {
    let mut flags = (value.tag() & 3) << TAG_SHIFT;
    if tagged {
        flags |= TAGS;
    }
    if deadline_ms(expires).is_none() {
        flags |= FAR;
    }
    if delta_ns != 0 {
        flags |= DELTA;
    }
    let key_len = StoredKey::of(key).rest().len();
    if key_len > SHORT_KEY {
        flags |= LONG_KEY;
    }
    Shape::of::<V>(flags, key_len, value.payload().len()).size
}

/// The optional parts of an entry besides its value and stamps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Extras {
    /// The generation (kept only with stamps: see `Entry::gen`).
    gen: u32,
    /// Microseconds of the last computation (0: none recorded).
    delta_us: u32,
    /// A charge that cannot be derived from the entry (see `Entry::fixed_weight`).
    weight: Option<u32>,
}

/// An entry: an owning thin pointer to its block. Moved in and out of a shard by `insert` and
/// `remove`; dropping it frees the block and drops the value and stamps it holds.
pub struct Entry<V> {
    ptr: NonNull<u8>,
    _owns: PhantomData<V>,
}

// SAFETY: an entry owns its block exclusively (like a `Box`); the block holds a `V`, `Stamps`
// (`Send + Sync`), plain integers and an atomic.
unsafe impl<V: Send> Send for Entry<V> {}
// SAFETY: shared access only reads the block, except `freq`, which is atomic.
unsafe impl<V: Sync> Sync for Entry<V> {}

impl<V: Pack> Entry<V> {
    /// A new entry of `key` holding `value` (its payload goes into the block), on no queue yet.
    pub fn new(key: &str, value: V, expires: u64, tags: impl Into<Stamps>) -> Self {
        let tag = value.tag();
        debug_assert!(tag <= 3, "tags are 0 to 3");
        // The payload is copied into the block before the value lets go of it; the value moves in
        // afterwards (or is dropped: a tagged value owns nothing).
        let payload = value.payload();
        let block = Self::build(
            StoredKey::of(key),
            payload,
            tag & 3,
            expires,
            tags.into(),
            Extras::default(),
        );
        let value = value.without_payload();
        if tag == 0 {
            // SAFETY: the block was shaped with room for a `V` (tag 0), still unwritten.
            unsafe { ptr::write(block.at::<V>(block.shape().v), value) };
        }
        block
    }

    /// The stored value (for a tagged value, the one its tag stands for).
    #[inline]
    pub fn value(&self) -> &V {
        match self.tag() {
            // SAFETY: tag 0 means the tail holds an initialized `V`.
            0 => unsafe { &*self.at::<V>(self.shape().v) },
            t => V::from_tag(t),
        }
    }
}

impl<V> Entry<V> {
    /// Allocates and writes a block (all of it but the `V` when `tag` is 0, which the caller
    /// writes next). Links are NIL, counter 0, queue `Main`.
    fn build(
        key: StoredKey<'_>,
        payload: &[u8],
        tag: u8,
        expires: u64,
        stamps: Stamps,
        x: Extras,
    ) -> Self {
        assert!(payload.len() <= MAX_PAYLOAD, "payloads are at most 64 KiB");
        let rest = key.rest();
        let key_len = u32::try_from(rest.len()).expect("keys are shorter than 4 GiB");
        let near = deadline_ms(expires);
        let mut flags = tag << TAG_SHIFT;
        if !stamps.is_empty() {
            flags |= TAGS;
        }
        if near.is_none() {
            flags |= FAR;
        }
        if x.delta_us != 0 {
            flags |= DELTA;
        }
        if x.weight.is_some() {
            flags |= WEIGHT;
        }
        let long = rest.len() > SHORT_KEY;
        if long {
            flags |= LONG_KEY;
        }
        let key_byte =
            if long { 0 } else { rest.len() as u8 } | if key.is_elided() { KEY_ELIDED } else { 0 };
        let shape = Shape::of::<V>(flags, rest.len(), payload.len());
        let layout = shape.layout();
        // SAFETY: the layout has a nonzero size (at least `NARROW_TAIL`).
        let raw = unsafe { alloc(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            handle_alloc_error(layout)
        };
        // SAFETY: `ptr` is a fresh block of `shape.size` bytes, aligned to 4 at least; every
        // write below is inside it at the offset `shape` gives, aligned for its type, and the
        // header's fields are written one by one (its padding overlaps the key).
        unsafe {
            let h = ptr.as_ptr().cast::<Header>();
            ptr::addr_of_mut!((*h).prev).write(NIL);
            ptr::addr_of_mut!((*h).next).write(NIL);
            ptr::addr_of_mut!((*h).expires).write(near.unwrap_or(NO_DEADLINE));
            ptr::addr_of_mut!((*h).flags).write(flags);
            ptr::addr_of_mut!((*h).freq).write(AtomicU8::new(0));
            ptr::addr_of_mut!((*h).payload_len).write(payload.len() as u16);
            ptr::addr_of_mut!((*h).key).write(key_byte);
            let base = ptr.as_ptr();
            if flags & TAGS != 0 {
                ptr::write(base.add(shape.tags).cast::<Stamps>(), stamps);
                ptr::write(base.add(shape.gen).cast::<u32>(), x.gen);
            }
            if flags & FAR != 0 {
                ptr::write(base.add(shape.far).cast::<u64>(), expires);
            }
            if flags & DELTA != 0 {
                ptr::write(base.add(shape.delta).cast::<u32>(), x.delta_us);
            }
            if let Some(w) = x.weight {
                ptr::write(base.add(shape.weight).cast::<u32>(), w);
            }
            if flags & LONG_KEY != 0 {
                ptr::write(base.add(shape.long_key).cast::<u32>(), key_len);
            }
            let k = base.add(shape.key);
            ptr::copy_nonoverlapping(rest.as_ptr(), k, rest.len());
            ptr::copy_nonoverlapping(payload.as_ptr(), k.add(rest.len()), payload.len());
        }
        Entry {
            ptr,
            _owns: PhantomData,
        }
    }

    #[inline]
    fn header(&self) -> *mut Header {
        self.ptr.as_ptr().cast::<Header>()
    }

    #[inline]
    fn flags(&self) -> u8 {
        // SAFETY: every block starts with a written header.
        unsafe { (*self.header()).flags }
    }

    #[inline]
    fn tag(&self) -> u8 {
        self.flags() >> TAG_SHIFT
    }

    /// The header's key byte.
    #[inline]
    fn key_byte(&self) -> u8 {
        // SAFETY: a written header field.
        unsafe { (*self.header()).key }
    }

    #[inline]
    fn shape(&self) -> Shape {
        // SAFETY: header fields are written; a long key's length is in the tail.
        let payload_len = unsafe { usize::from((*self.header()).payload_len) };
        let key_len = usize::from(self.key_byte() & !KEY_ELIDED);
        let flags = self.flags();
        let mut shape = Shape::of::<V>(flags, key_len, payload_len);
        if flags & LONG_KEY != 0 {
            // SAFETY: LONG_KEY: the tail holds the key's length at `long_key`.
            let n = unsafe { *self.at::<u32>(shape.long_key) } as usize;
            shape = Shape::of::<V>(flags, n, payload_len);
        }
        shape
    }

    /// A pointer to the `T` at byte `offset` of the block.
    #[inline]
    fn at<T>(&self, offset: usize) -> *mut T {
        // SAFETY: callers pass offsets from `shape`, inside the block.
        unsafe { self.ptr.as_ptr().add(offset).cast::<T>() }
    }

    /// Bytes of the key the block holds (without an elided prefix).
    #[inline]
    fn key_len(&self) -> usize {
        if self.flags() & LONG_KEY != 0 {
            // SAFETY: as in `shape`.
            unsafe { *self.at::<u32>(self.shape().long_key) as usize }
        } else {
            usize::from(self.key_byte() & !KEY_ELIDED)
        }
    }

    /// The entry's key (see `StoredKey`: it stands for the whole key in every comparison, hash
    /// and listing).
    #[inline]
    pub fn key(&self) -> StoredKey<'_> {
        let shape = self.shape();
        let n = self.key_len();
        // SAFETY: `build` copied a `str` of `n` bytes to `shape.key`; the block lives as long as
        // `self` and is never written there again.
        let rest = unsafe {
            std::str::from_utf8_unchecked(std::slice::from_raw_parts(self.at::<u8>(shape.key), n))
        };
        StoredKey::from_parts(self.key_byte() & KEY_ELIDED != 0, rest)
    }

    /// The value's bytes kept in the block (empty if the value holds them itself).
    #[inline]
    pub fn payload(&self) -> &[u8] {
        let shape = self.shape();
        // SAFETY: a written header field; `build` copied the payload right after the key.
        unsafe {
            let n = usize::from((*self.header()).payload_len);
            std::slice::from_raw_parts(self.at::<u8>(shape.key + self.key_len()), n)
        }
    }

    /// The stored value when the entry holds one (not for a tagged value).
    #[inline]
    pub fn value_mut(&mut self) -> Option<&mut V> {
        // SAFETY: tag 0: an initialized `V`, borrowed through `&mut self`.
        (self.tag() == 0).then(|| unsafe { &mut *self.at::<V>(self.shape().v) })
    }

    /// Bytes of the block (what `mem::malloc_chunk` rounds).
    #[inline]
    pub fn block_size(&self) -> usize {
        self.shape().size
    }

    /// What the entry's charge follows, read at once: the block's size, the number of tag
    /// stamps, and whether it has a deadline.
    #[inline]
    pub fn footprint(&self) -> (usize, usize, bool) {
        let shape = self.shape();
        let flags = self.flags();
        let tags = if flags & TAGS != 0 {
            // SAFETY: TAGS: the tail holds initialized `Stamps`.
            unsafe { (&*self.at::<Stamps>(shape.tags)).len() }
        } else {
            0
        };
        // SAFETY: a written header field.
        let timed = flags & FAR != 0 || unsafe { (*self.header()).expires } != NO_DEADLINE;
        (shape.size, tags, timed)
    }

    /// The clock stamp after which the entry is gone (`NEVER` for none): the deadline it was
    /// stored with, rounded down to the millisecond.
    #[inline]
    pub fn expires(&self) -> u64 {
        if self.flags() & FAR != 0 {
            // SAFETY: FAR: the tail holds the deadline.
            return unsafe { *self.at::<u64>(self.shape().far) };
        }
        // SAFETY: a written header field.
        match unsafe { (*self.header()).expires } {
            NO_DEADLINE => NEVER,
            ms => u64::from(ms) * 1_000_000,
        }
    }

    #[inline]
    pub fn is_expired(&self, now: u64) -> bool {
        let e = self.expires();
        e != NEVER && e <= now
    }

    /// Hits since the policy last looked at the entry (S3-FIFO), bumped under a shared lock.
    #[inline]
    pub fn freq(&self) -> &AtomicU8 {
        // SAFETY: a written atomic header field, alive as long as `self`.
        unsafe { &*ptr::addr_of!((*self.header()).freq) }
    }

    /// The entry's tag stamps (empty for an untagged entry).
    #[inline]
    pub fn tags(&self) -> &[TagStamp] {
        if self.flags() & TAGS == 0 {
            return &[];
        }
        // SAFETY: TAGS: the tail holds initialized `Stamps`.
        unsafe { &*self.at::<Stamps>(self.shape().tags) }
    }

    /// The generation of a tagged entry (`None` for an untagged one, which has none): set by
    /// the store to its write counter whenever it stores the entry or changes its value, so that
    /// a tag's member list, which refers to the entry by slot and generation, never takes a
    /// later entry at the same slot for it (nor `Store::replace_if` a replaced value for the one
    /// it read). 0 until `set_gen`; kept by `reshaped`.
    #[inline]
    pub fn gen(&self) -> Option<u32> {
        if self.flags() & TAGS == 0 {
            return None;
        }
        // SAFETY: TAGS: the tail holds the generation.
        Some(unsafe { *self.at::<u32>(self.shape().gen) })
    }

    /// Sets the generation of a tagged entry (see `gen`); an untagged entry has none: nothing
    /// to set.
    #[inline]
    pub(crate) fn set_gen(&mut self, gen: u32) {
        if self.flags() & TAGS != 0 {
            // SAFETY: TAGS: the tail holds the generation, written through `&mut self`.
            unsafe { *self.at::<u32>(self.shape().gen) = gen }
        }
    }

    /// The block's address: with the shard's write counter, what tells an untagged entry from a
    /// later one (`Store::snapshot`). Not unique over time: a freed block's address is reused.
    #[inline]
    pub fn addr(&self) -> usize {
        self.ptr.as_ptr() as usize
    }

    #[inline]
    fn delta_us(&self) -> u32 {
        if self.flags() & DELTA == 0 {
            return 0;
        }
        // SAFETY: DELTA: the tail holds it.
        unsafe { *self.at::<u32>(self.shape().delta) }
    }

    /// Nanoseconds the last computation of the value took (0: unknown), to the microsecond.
    #[inline]
    pub fn delta(&self) -> u64 {
        u64::from(self.delta_us()) * 1000
    }

    /// A charge recorded with the entry because it cannot be derived from it (see
    /// `store::Store::charge`), if any.
    #[inline]
    pub fn fixed_weight(&self) -> Option<u64> {
        if self.flags() & WEIGHT == 0 {
            return None;
        }
        // SAFETY: WEIGHT: the tail holds it.
        Some(u64::from(unsafe { *self.at::<u32>(self.shape().weight) }))
    }

    /// The queue the entry is threaded on.
    #[inline]
    pub fn queue(&self) -> Queue {
        if self.flags() & SMALL != 0 {
            Queue::Small
        } else {
            Queue::Main
        }
    }

    #[inline]
    pub(crate) fn set_queue(&mut self, q: Queue) {
        // SAFETY: a header field, written through `&mut self`.
        unsafe {
            let h = self.header();
            (*h).flags = ((*h).flags & !SMALL) | if q == Queue::Small { SMALL } else { 0 };
        }
    }

    #[inline]
    pub(crate) fn links(&self) -> (u32, u32) {
        // SAFETY: written header fields.
        unsafe { ((*self.header()).prev, (*self.header()).next) }
    }

    #[inline]
    pub(crate) fn set_prev(&mut self, prev: u32) {
        // SAFETY: a header field, written through `&mut self`.
        unsafe { (*self.header()).prev = prev }
    }

    #[inline]
    pub(crate) fn set_next(&mut self, next: u32) {
        // SAFETY: a header field, written through `&mut self`.
        unsafe { (*self.header()).next = next }
    }

    /// Copies links, queue and counter from `from`, whose place in the shard this entry (not yet
    /// in any shard) is to take. (Not its generation: the store gives it its own, `set_gen`.)
    pub(crate) fn take_place_of(&mut self, from: &Entry<V>) {
        self.copy_links(from);
    }

    fn copy_links(&self, from: &Entry<V>) {
        let (prev, next) = from.links();
        // SAFETY: header fields of a block this entry owns and no one else sees yet.
        unsafe {
            let h = self.header();
            (*h).prev = prev;
            (*h).next = next;
            (*h).flags = ((*h).flags & !SMALL) | (from.flags() & SMALL);
            (*h).freq = AtomicU8::new(from.freq().load(std::sync::atomic::Ordering::Relaxed));
        }
    }

    /// The entry with deadline `expires`, compute time `delta_ns` (0: none) and fixed charge
    /// `weight`: changed in place when the block keeps its shape, else moved to a new block
    /// (same key, payload, value, stamps, generation, links and counter).
    pub fn reshaped(self, expires: u64, delta_ns: u64, weight: Option<u32>) -> Self {
        let delta_us = u32::try_from(delta_ns.div_ceil(1000)).unwrap_or(u32::MAX);
        let near = deadline_ms(expires);
        let flags = self.flags();
        let same = (flags & FAR != 0) == near.is_none()
            && (flags & DELTA != 0) == (delta_us != 0)
            && (flags & WEIGHT != 0) == weight.is_some();
        if same {
            let shape = self.shape();
            // SAFETY: the fields written exist in this shape (checked just above).
            unsafe {
                (*self.header()).expires = near.unwrap_or(NO_DEADLINE);
                if near.is_none() {
                    *self.at::<u64>(shape.far) = expires;
                }
                if delta_us != 0 {
                    *self.at::<u32>(shape.delta) = delta_us;
                }
                if let Some(w) = weight {
                    *self.at::<u32>(shape.weight) = w;
                }
            }
            return self;
        }
        let shape = self.shape();
        let tag = self.tag();
        // SAFETY: the stamps are moved out of the old block, which is then freed without
        // dropping them (`ManuallyDrop` + `free_moved`).
        let stamps = if flags & TAGS != 0 {
            unsafe { ptr::read(self.at::<Stamps>(shape.tags)) }
        } else {
            Stamps::default()
        };
        let gen = self.gen().unwrap_or(0);
        let old = ManuallyDrop::new(self);
        let new = Self::build(
            old.key(),
            old.payload(),
            tag,
            expires,
            stamps,
            Extras {
                gen,
                delta_us,
                weight,
            },
        );
        new.copy_links(&old);
        // SAFETY: moves the `V` (tag 0) into the new block's room for it, then frees the old
        // block without dropping anything in it (the value and stamps moved on).
        unsafe {
            if tag == 0 {
                ptr::copy_nonoverlapping(old.at::<V>(shape.v), new.at::<V>(new.shape().v), 1);
            }
            dealloc(old.ptr.as_ptr(), shape.layout());
        }
        new
    }

    /// Sets the compute time (see `reshaped`): nanoseconds, kept in whole microseconds rounded
    /// up so that a recorded time is never taken for none (at most 71 minutes).
    pub fn with_delta(self, delta_ns: u64) -> Self {
        let (expires, weight) = (self.expires(), self.fixed_weight());
        self.reshaped(expires, delta_ns, weight.map(|w| w as u32))
    }
}

impl<V> Drop for Entry<V> {
    fn drop(&mut self) {
        let shape = self.shape();
        let flags = self.flags();
        // SAFETY: the block is this entry's own; the value (tag 0) and stamps (TAGS) in it are
        // initialized and dropped once, then the block is freed with the layout it was
        // allocated with (`shape` follows from the header alone).
        unsafe {
            if flags >> TAG_SHIFT == 0 {
                ptr::drop_in_place(self.at::<V>(shape.v));
            }
            if flags & TAGS != 0 {
                ptr::drop_in_place(self.at::<Stamps>(shape.tags));
            }
            dealloc(self.ptr.as_ptr(), shape.layout());
        }
    }
}

/// A value for the tests of the shard and the policies (also built under `shuttle`).
#[cfg(test)]
impl Pack for u32 {
    fn from_tag(_: u8) -> &'static u32 {
        unreachable!("u32 values are never tagged")
    }
}

// Under `shuttle` the tag table's locks work only inside a shuttle run: see the models.
#[cfg(all(test, not(feature = "shuttle")))]
mod tests {
    use super::*;
    use crate::tags::TagTable;

    const SEC: u64 = 1_000_000_000;
    use std::sync::atomic::Ordering::Relaxed;

    thread_local! {
        /// Drops of `Counted::Big` on this thread (tests run in parallel threads).
        static DROPS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    fn drops() -> usize {
        DROPS.with(|d| d.get())
    }

    /// A value that counts its drops, inline (tagged, payload in the block) or stored.
    #[derive(Debug, PartialEq)]
    enum Counted {
        /// A value on its way in: its bytes become the payload, then it is `Tagged`.
        Small(Vec<u8>),
        Tagged,
        Big(String),
    }

    static TAGGED: Counted = Counted::Tagged;

    impl Pack for Counted {
        fn payload(&self) -> &[u8] {
            match self {
                Counted::Small(b) => b,
                _ => &[],
            }
        }
        fn tag(&self) -> u8 {
            matches!(self, Counted::Small(_) | Counted::Tagged) as u8 * 2
        }
        fn without_payload(self) -> Self {
            match self {
                Counted::Small(_) => Counted::Tagged,
                other => other,
            }
        }
        fn from_tag(tag: u8) -> &'static Self {
            assert_eq!(tag, 2);
            &TAGGED
        }
    }

    impl Drop for Counted {
        fn drop(&mut self) {
            if let Counted::Big(_) = self {
                DROPS.with(|d| d.set(d.get() + 1));
            }
        }
    }

    #[test]
    fn header_and_smallest_shapes() {
        assert_eq!(size_of::<Entry<u32>>(), 8);
        assert_eq!(size_of::<Option<Entry<u32>>>(), 8);
        // A tagged value with a 19-byte key and 100-byte payload: one 136-byte block.
        let s = Shape::of::<u32>(1 << TAG_SHIFT, 19, 100);
        assert_eq!((s.key, s.size, s.align), (HEADER, 136, 4));
        assert_eq!(crate::mem::malloc_chunk(s.size), 144);
        // A stored 16-byte value: a 24-byte header, the value, then the key.
        let s = Shape::of::<(u64, u64)>(0, 13, 0);
        assert_eq!((s.v, s.key, s.size, s.align), (24, 40, 53, 8));
        // A tail of 4-byte fields only starts after the header struct.
        let s = Shape::of::<u32>(1 << TAG_SHIFT | DELTA, 13, 0);
        assert_eq!((s.delta, s.key, s.size, s.align), (20, 24, 37, 4));
        // A tagged entry's generation follows its stamps (the wide tail: 8-aligned).
        let s = Shape::of::<u32>(1 << TAG_SHIFT | TAGS | DELTA, 19, 100);
        assert_eq!((s.tags, s.gen), (TAIL, TAIL + size_of::<Stamps>()));
        assert_eq!((s.delta, s.key, s.align), (s.gen + 4, s.gen + 8, 8));
        // Never smaller than the header struct.
        assert_eq!(Shape::of::<u32>(1 << TAG_SHIFT, 0, 0).size, NARROW_TAIL);
    }

    /// A 100-byte payload as `Pack` puts it in the block (as the Python layer's bytes do).
    struct Bytes100;

    static BYTES100: Bytes100 = Bytes100;

    impl Pack for Bytes100 {
        fn payload(&self) -> &[u8] {
            &[7; 100]
        }
        fn tag(&self) -> u8 {
            1
        }
        fn from_tag(_: u8) -> &'static Self {
            &BYTES100
        }
    }

    #[test]
    fn the_benchmarks_entry_takes_a_144_byte_chunk() {
        // Issue 12's benchmark: `user:N:profile` under Django's default key function.
        let key = ":1:user:123456:profile";
        let e = Entry::new(key, Bytes100, 5 * SEC, Vec::new());
        assert_eq!(e.block_size(), 136);
        assert_eq!(planned_size(key, &Bytes100, false, 5 * SEC, 0), 136);
        assert_eq!(crate::mem::malloc_chunk(e.block_size()), 144);
        assert_eq!((e.key(), e.payload()), (StoredKey::of(key), &[7; 100][..]));
        // The same key under another version or prefix keeps its whole text: 3 bytes more,
        // which here take the next chunk.
        for other in [":2:user:123456:profile", "p:1:user:123456:profile"] {
            let e = Entry::new(other, Bytes100, 5 * SEC, Vec::new());
            assert!(e.block_size() > 136 && e.key() == other);
            assert_eq!(
                planned_size(other, &Bytes100, false, 5 * SEC, 0),
                e.block_size()
            );
            assert_eq!(crate::mem::malloc_chunk(e.block_size()), 160);
        }
    }

    #[test]
    fn keys_around_the_short_limit_and_the_elided_prefix_round_trip() {
        for stored in [
            0,
            1,
            SHORT_KEY - 1,
            SHORT_KEY,
            SHORT_KEY + 1,
            255,
            256,
            70_000,
        ] {
            let rest = "é".repeat(stored / 2) + &"k".repeat(stored % 2);
            for key in [rest.clone(), format!(":1:{rest}")] {
                let made = key.starts_with(":1:");
                for value in [Counted::Small(b"pay".to_vec()), Counted::Big("v".into())] {
                    let stored_v = matches!(value, Counted::Big(_));
                    let before = planned_size(&key, &value, false, NEVER, 0);
                    let e = Entry::new(&key, value, NEVER, Vec::new());
                    assert_eq!((e.key(), e.key().is_elided()), (StoredKey::of(&key), made));
                    assert_eq!(e.key().to_string(), key);
                    assert_eq!(e.key_len(), stored);
                    assert_eq!(e.block_size(), before);
                    let long = stored > SHORT_KEY;
                    assert_eq!(e.flags() & LONG_KEY != 0, long, "{stored}");
                    // header, tail (the long key's length, a stored value), key and payload.
                    let start = match (stored_v, long) {
                        (true, _) => {
                            24 + size_of::<Counted>().next_multiple_of(8) + if long { 4 } else { 0 }
                        }
                        (false, true) => 24,
                        (false, false) => HEADER,
                    };
                    let payload = if stored_v { 0 } else { 3 };
                    assert_eq!(e.block_size(), start + stored + payload, "{stored} {made}");
                    if !stored_v {
                        assert_eq!(e.payload(), b"pay");
                    }
                    // A new block (a fixed charge) keeps the key as it was.
                    let e = e.reshaped(NEVER, 0, Some(5));
                    assert_eq!(e.key().to_string(), key);
                    assert_eq!(e.fixed_weight(), Some(5));
                }
            }
        }
    }

    #[test]
    fn every_tail_combination_round_trips_and_drops_once() {
        let table = TagTable::default();
        let long_key = "k".repeat(70_000);
        let far = 60 * 86_400 * 1_000_000_000u64; // 60 days: beyond the header's range
        let before = drops();
        let mut made = 0;
        let long_made = format!(":1:{long_key}");
        for bits in 0..64u32 {
            let stored = bits & 1 != 0;
            let tagged = bits & 2 != 0;
            let is_far = bits & 4 != 0;
            let delta = bits & 8 != 0;
            let long = bits & 16 != 0;
            let elided = bits & 32 != 0;
            let key = match (long, elided) {
                (false, false) => "key:1",
                (false, true) => ":1:key:1",
                (true, false) => long_key.as_str(),
                (true, true) => long_made.as_str(),
            };
            let expires = if is_far { far } else { 1_500_000_000 };
            let stamps = if tagged {
                table.stamps(["t1", "t2"])
            } else {
                Vec::new()
            };
            let value = if stored {
                made += 1;
                Counted::Big(format!("v{bits}"))
            } else {
                Counted::Small(vec![bits as u8; 37])
            };
            let mut e = Entry::new(key, value, expires, stamps);
            if delta {
                e = e.with_delta(2_500);
            }
            e.set_prev(bits + 7);
            e.set_queue(Queue::Small);
            e.freq().store(2, Relaxed);
            // Only a tagged entry keeps a generation (0 until set); setting one on an untagged
            // entry writes nothing.
            assert_eq!(e.gen(), tagged.then_some(0));
            let gen = 0xdead_0000 | bits;
            e.set_gen(gen);
            assert_eq!(e.gen(), tagged.then_some(gen));
            // The reshapes below move or keep the block; everything must survive both.
            for round in 0..3 {
                assert_eq!(e.key(), key, "bits {bits} round {round}");
                assert_eq!(e.key().to_string(), key);
                assert_eq!(e.key().is_elided(), elided);
                assert_eq!(e.expires(), expires);
                assert!(!e.is_expired(expires - 1));
                assert!(e.is_expired(expires));
                assert_eq!(e.tags().len(), if tagged { 2 } else { 0 });
                assert_eq!(e.gen(), tagged.then_some(gen), "bits {bits} round {round}");
                assert_eq!(e.delta(), if delta { 3_000 } else { 0 });
                assert_eq!(
                    (e.links(), e.queue(), e.freq().load(Relaxed)),
                    ((bits + 7, NIL), Queue::Small, 2)
                );
                if stored {
                    // (Compared without making a `Big`, whose drop would count.)
                    assert!(matches!(e.value(), Counted::Big(v) if *v == format!("v{bits}")));
                    assert!(e.payload().is_empty());
                    assert!(e.value_mut().is_some());
                } else {
                    assert_eq!(e.value(), &Counted::Tagged);
                    assert_eq!(e.payload(), &[bits as u8; 37][..]);
                    assert!(e.value_mut().is_none());
                }
                // Same shape (in place), then a fixed charge (a new block), then none again.
                let w = (round == 1).then_some(1234);
                let d = e.delta();
                e = e.reshaped(expires, d, w);
                assert_eq!(e.fixed_weight(), w.map(u64::from));
            }
            drop(e);
        }
        assert_eq!(
            drops() - before,
            made,
            "each stored value dropped exactly once"
        );
    }

    #[test]
    fn deadlines_round_down_to_the_millisecond_and_move_to_the_tail_when_far() {
        let e: Entry<u32> = Entry::new("k", 5, 2_999_999, Vec::new());
        assert_eq!(e.expires(), 2_000_000);
        assert_eq!(rounded_deadline(2_999_999), 2_000_000);
        assert!(
            e.is_expired(2_999_999),
            "gone once the deadline asked for has passed"
        );
        let e: Entry<u32> = Entry::new("k", 5, 0, Vec::new());
        assert!(e.is_expired(0), "0 is already expired");
        let e: Entry<u32> = Entry::new("k", 5, NEVER, Vec::new());
        assert_eq!(e.expires(), NEVER);
        assert!(!e.is_expired(NEVER - 1));
        let near_block = e.block_size();
        // Near -> far -> never, in place or not, keeping the value.
        let e = e.reshaped(NEVER - 1, 0, None);
        assert_eq!((e.expires(), *e.value()), (NEVER - 1, 5));
        assert_eq!(e.block_size(), near_block + 8);
        let e = e.reshaped(NEVER, 0, None);
        assert_eq!((e.expires(), e.block_size()), (NEVER, near_block));
    }

    #[test]
    fn a_new_entry_takes_the_place_of_an_old_one() {
        let table = TagTable::default();
        let before = drops();
        let mut old = Entry::new(
            "key",
            Counted::Big("old".into()),
            5 * SEC,
            table.stamps(["a"]),
        );
        old.set_prev(3);
        old.set_next(4);
        old.set_queue(Queue::Small);
        old.freq().store(3, Relaxed);
        let mut new = Entry::new(
            "key",
            Counted::Small(b"payload".to_vec()),
            5 * SEC,
            Vec::new(),
        );
        new.take_place_of(&old);
        assert_eq!(
            (new.key(), new.payload(), new.value()),
            (StoredKey::of("key"), &b"payload"[..], &Counted::Tagged)
        );
        assert_eq!((new.links(), new.queue()), ((3, 4), Queue::Small));
        assert_eq!(new.freq().load(Relaxed), 3);
        drop(new);
        assert_eq!(drops(), before);
        drop(old);
        assert_eq!(drops(), before + 1);
    }
}
