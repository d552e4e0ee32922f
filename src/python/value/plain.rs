//! Plain values: exact `dict`, `list` and `tuple` of `str`, `bytes`, `int`, `float`, `bool` and
//! `None`, and instances of plain classes (see `instance.rs`) holding such values, nested. The
//! store holds them in a form that `get` copies structurally, which gives the same value, types
//! and order as a pickle round trip at a fraction of its cost.
//!
//! The stored form adds no work for Python's garbage collector: it holds no GC-tracked object.
//! Atoms are not GC objects; a tuple of atoms (which CPython's GC would untrack at its first
//! collection anyway) is untracked at once and returned as is; a dict of scalars is copied by the
//! store (`PyDict_Copy`), untracked, and handed out through `PyDict_Copy`; anything else (lists,
//! other dicts, tuples holding containers, instances) is one buffer of words (`Flat`) rebuilt on
//! each `get`; an instance's word holds its class (a reference, not a new object), its state
//! follows it.
//!
//! Pickle semantics the walk refuses to approximate send the value to the pickle path instead:
//! a list, dict or instance (or an instance's `__dict__`) met twice (a shared sub-object or a
//! cycle: pickle keeps the identity), any subclass or other type, more than `MAX_DEPTH` levels or
//! `MAX_NODES` objects.

use std::mem::size_of;
use std::ptr::addr_of_mut;
use std::sync::Arc;

use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyDict;

use super::instance::{self, Class, Instance};
use super::sizes;
use crate::mem::malloc_chunk;

/// Containers nested deeper than this are pickled (pickle's own limit is the recursion limit).
pub const MAX_DEPTH: usize = 32;
/// Values holding more objects (keys and values, counted before walking) than this are pickled.
pub const MAX_NODES: usize = 100_000;
/// Atoms of at most this many bytes (ints, floats, `str` of up to 15 ASCII characters on 3.11,
/// 23 from 3.12) are charged each time a value holds them, without looking them up (`keep`).
const SMALL_ATOM: usize = 64;
/// Once a walk has counted this many objects, the whole value is counted first (`count`), so
/// that a value past `MAX_NODES` goes to pickle before the walk has copied most of it: walked
/// to the bound and then pickled, such a value cost `set` pickle's time 2 to 4 times over.
const COUNT_AT: usize = MAX_NODES / 8;

/// The stored form of a plain value that is not an atom or a dict of scalars: one buffer of
/// words, written in the walk's order (a container's header, then its items), which `get` reads
/// back in the same order (`Reader`). A word's low 3 bits (`TAG`) say what it is:
///
/// - `ATOM`: an owned reference to an immutable object (atom, or tuple of atoms, untracked),
///   shared by every copy;
/// - `DICT`: an owned reference to the store's own copy of a dict of scalars, untracked, copied
///   with `PyDict_Copy`;
/// - `INSTANCE`: an owned `Box<Instance>` (a plain class instance, see `instance.rs`), followed
///   by its state as a `MAP`;
/// - `LIST`, `TUPLE`: the item count (above the tag), followed by the items (a `TUPLE` holds a
///   container, or it would be an atom);
/// - `MAP`: a dict holding containers: the item count, followed by each atom key and its value.
///
/// Objects and boxes are at least 8-byte aligned (the walk refuses a value holding one that is
/// not), which leaves the tag bits free. One buffer instead of a node per container: `set` of a
/// large value spent a fifth of its time allocating nodes and freeing the ones it replaced
/// (a box per container, pyo3's thread-state check per reference dropped).
pub struct Flat {
    words: Box<[usize]>,
}

const TAG: usize = 7;
const ATOM: usize = 0;
const DICT: usize = 1;
const INSTANCE: usize = 2;
const LIST: usize = 3;
const TUPLE: usize = 4;
const MAP: usize = 5;

/// Releases what the words own (see `Flat`). On a thread attached to Python (where the store
/// drops its values: values removed off it wait in `Graveyard` for one) the references go at
/// once, with one check of the thread's state for the whole buffer (a check per reference, as
/// dropping a `Py` makes, was a twentieth of `set` of a large value, which drops the copy it
/// replaces). A thread that is not attached attaches, as pyo3's `attach` does; where it cannot
/// (the interpreter is going away), each reference goes as a `Py` does (queued by pyo3).
fn release(words: &[usize]) {
    if words.is_empty() {
        return;
    }
    let done = Python::try_attach(|_py| {
        for &w in words {
            // SAFETY: attached; each owned word is released once (its buffer is going away).
            unsafe { release_word(w, true) };
        }
    });
    if done.is_none() {
        for &w in words {
            // SAFETY: as above, through pyo3's checks.
            unsafe { release_word(w, false) };
        }
    }
}

/// # Safety
/// `w` must be an owned word, released once; `attached`: the thread is attached to Python.
#[inline(always)]
unsafe fn release_word(w: usize, attached: bool) {
    match w & TAG {
        ATOM | DICT => {
            let p = (w & !TAG) as *mut ffi::PyObject;
            if attached {
                ffi::Py_DecRef(p);
            } else {
                // Building the `Py` touches no Python state (the token only names a lifetime);
                // its drop checks that the thread is attached, and queues the decref if not.
                drop(Bound::from_owned_ptr(Python::assume_attached(), p).unbind());
            }
        }
        INSTANCE => drop(Box::from_raw((w & !TAG) as *mut Instance)),
        _ => {}
    }
}

impl Drop for Flat {
    fn drop(&mut self) {
        release(&self.words);
    }
}

/// The words a walk has written so far: released if the walk gives up.
struct Words(Vec<usize>);

impl Drop for Words {
    fn drop(&mut self) {
        release(&self.0);
    }
}

impl Words {
    /// Drops the words from `start` on (the walk runs attached).
    fn truncate(&mut self, start: usize) {
        for w in self.0.drain(start..) {
            // SAFETY: the drained words are owned and released once, attached.
            unsafe { release_word(w, true) };
        }
    }
}

/// What `classify` made of a value.
pub enum Plain {
    /// An exact `int` that fits in 64 bits.
    Int(i64),
    /// An immutable object to keep and return as is, with its weight.
    Atom(usize),
    /// A dict of scalars (see `DICT`), with the weight of the whole value.
    Dict(Py<PyDict>, usize),
    /// Any other plain value, with the weight of the whole value.
    Tree(Flat, usize),
    /// Not a plain value: pickle it.
    No,
}

/// Sorts a value into the stored forms above (no Python code runs).
pub fn classify(v: &Bound<'_, PyAny>) -> Plain {
    let p = v.as_ptr();
    // SAFETY: `p` is a live object (borrowed through `v`); reading its type and comparing it with
    // the builtin type objects' addresses reads no mutable state.
    let t = unsafe { ffi::Py_TYPE(p) };
    unsafe {
        if t == addr_of_mut!(ffi::PyUnicode_Type) {
            return Plain::Atom(sizes::str_size(v.py(), p));
        }
        if t == addr_of_mut!(ffi::PyLong_Type) {
            let mut overflow = 0;
            let i = ffi::PyLong_AsLongLongAndOverflow(p, &mut overflow);
            let failed = i == -1 && !ffi::PyErr_Occurred().is_null();
            if overflow == 0 && !failed {
                return Plain::Int(i);
            }
            ffi::PyErr_Clear();
            return Plain::Atom(big_int_weight(v));
        }
        if t == addr_of_mut!(ffi::PyBytes_Type) {
            return Plain::Atom(sizes::bytes_size(ffi::PyBytes_Size(p) as usize));
        }
        if t == addr_of_mut!(ffi::PyFloat_Type) {
            return Plain::Atom(sizes::FLOAT_SIZE);
        }
        if p == ffi::Py_None() || t == addr_of_mut!(ffi::PyBool_Type) {
            return Plain::Atom(0); // singletons
        }
        if t != addr_of_mut!(ffi::PyTuple_Type)
            && t != addr_of_mut!(ffi::PyList_Type)
            && t != addr_of_mut!(ffi::PyDict_Type)
            && !instance::candidate(t)
        {
            return Plain::No;
        }
    }
    let mut walk = Walk {
        seen: Seen::default(),
        atoms: Seen::default(),
        nodes: 1,
        root: p,
        counted: false,
        in_repeated: 0,
        weight: 0,
        classes: Vec::new(),
        out: Words(Vec::with_capacity(16)),
    };
    if walk.value(v.clone(), 0).is_none() {
        return Plain::No;
    }
    match walk.out.0[..] {
        [w] if w & TAG == ATOM => Plain::Atom(walk.weight),
        [w] if w & TAG == DICT => {
            walk.out.0.clear(); // its reference moves to the `Py` below
                                // SAFETY: the word is an owned reference to the store's dict of scalars.
            let d = unsafe {
                Bound::from_owned_ptr(v.py(), (w & !TAG) as *mut ffi::PyObject)
                    .cast_into_unchecked::<PyDict>()
                    .unbind()
            };
            Plain::Dict(d, walk.weight)
        }
        _ => {
            let words = std::mem::take(&mut walk.out.0).into_boxed_slice();
            // The buffer, and the `Arc` holding the `Flat` (two counters and the box).
            let weight = walk.weight
                + malloc_chunk(words.len() * size_of::<usize>())
                + malloc_chunk(16 + size_of::<Flat>());
            Plain::Tree(Flat { words }, weight)
        }
    }
}

/// A fresh copy of a stored dict of scalars (same keys, order and values).
///
/// `PyDict_Copy` keeps the source's GC state, so the copy of our untracked dict is untracked.
/// CPython up to 3.13 tracks a dict as soon as a container is put in it; from 3.14 on
/// (gh-127010) it tracks every dict from the start and never again, so there the copy is handed
/// out tracked, or a cycle made through it later would never be collected.
pub fn copy_dict<'py>(d: &Bound<'py, PyDict>) -> PyResult<Bound<'py, PyAny>> {
    let copy = d.copy()?;
    if !lazy_dict_tracking(d.py()) {
        // SAFETY: a dict is a GC type; it is tracked here only if it is not already.
        unsafe {
            if ffi::PyObject_GC_IsTracked(copy.as_ptr()) == 0 {
                ffi::PyObject_GC_Track(copy.as_ptr().cast());
            }
        }
    }
    Ok(copy.into_any())
}

/// Whether this CPython leaves a new dict untracked until a container is put in it (true up to
/// 3.13): asked once, of an empty dict.
fn lazy_dict_tracking(py: Python<'_>) -> bool {
    static LAZY: PyOnceLock<bool> = PyOnceLock::new();
    *LAZY.get_or_init(py, || {
        // SAFETY: a new empty dict, only asked whether it is tracked.
        unsafe { ffi::PyObject_GC_IsTracked(PyDict::new(py).as_ptr()) == 0 }
    })
}

/// A fresh Python value from a stored one: new containers, shared atoms.
pub fn build<'py>(py: Python<'py>, flat: &Flat) -> PyResult<Bound<'py, PyAny>> {
    Reader {
        words: &flat.words,
        pos: 0,
    }
    .value(py)
}

/// Reads a `Flat` back in the order it was written. Its owner keeps the `Flat` alive while it
/// reads (`decode` holds the `Arc`), whatever Python code runs meanwhile (a collection that an
/// allocation starts, an instance's `__setstate__`).
pub struct Reader<'a> {
    words: &'a [usize],
    pos: usize,
}

/// A buffer that does not read as the walk wrote it (a bug: never expected).
fn corrupt() -> PyErr {
    pyo3::exceptions::PyRuntimeError::new_err("a stored plain value is corrupt")
}

impl Reader<'_> {
    #[inline(always)]
    fn next(&mut self) -> PyResult<usize> {
        let w = *self.words.get(self.pos).ok_or_else(corrupt)?;
        self.pos += 1;
        Ok(w)
    }

    /// The item count of the `MAP` that comes next (an instance's state).
    pub fn map_len(&mut self) -> PyResult<usize> {
        let w = self.next()?;
        if w & TAG != MAP {
            return Err(corrupt());
        }
        Ok(w >> 3)
    }

    /// The atom that comes next (a key), as a new reference.
    pub fn atom<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        // SAFETY: the atom is a reference the buffer owns, alive while the buffer is.
        Ok(unsafe { Bound::from_borrowed_ptr(py, self.atom_ptr()?) })
    }

    /// The atom that comes next, borrowed from the buffer (alive while it is).
    fn atom_ptr(&mut self) -> PyResult<*mut ffi::PyObject> {
        let w = self.next()?;
        if w & TAG != ATOM {
            return Err(corrupt());
        }
        Ok(w as *mut ffi::PyObject)
    }

    /// The value that comes next, rebuilt.
    pub fn value<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let w = self.next()?;
        let (p, len) = ((w & !TAG) as *mut ffi::PyObject, w >> 3);
        // SAFETY: `ATOM` and `DICT` words are references the buffer owns (alive while it is),
        // `INSTANCE` words boxes it owns; PyList_New and PyTuple_New return new references (or
        // NULL with an exception set), and their SetItem steals the item's reference into a
        // slot of that new container, which nobody else sees before it is filled.
        unsafe {
            match w & TAG {
                ATOM => Ok(Bound::from_borrowed_ptr(py, p)),
                DICT => copy_dict(Bound::from_borrowed_ptr(py, p).cast_unchecked()),
                INSTANCE => instance::build(py, &*(p as *const Instance), self),
                LIST => {
                    let list = Bound::from_owned_ptr_or_err(py, ffi::PyList_New(len as _))?;
                    for i in 0..len {
                        let item = self.value(py)?;
                        if ffi::PyList_SetItem(list.as_ptr(), i as _, item.into_ptr()) != 0 {
                            return Err(PyErr::fetch(py));
                        }
                    }
                    Ok(list)
                }
                TUPLE => {
                    let tuple = Bound::from_owned_ptr_or_err(py, ffi::PyTuple_New(len as _))?;
                    for i in 0..len {
                        let item = self.value(py)?;
                        if ffi::PyTuple_SetItem(tuple.as_ptr(), i as _, item.into_ptr()) != 0 {
                            return Err(PyErr::fetch(py));
                        }
                    }
                    Ok(tuple)
                }
                MAP => {
                    let d = PyDict::new(py);
                    for _ in 0..len {
                        let k = self.atom_ptr()?;
                        let v = self.value(py)?;
                        // Atom keys: hashing and comparing them runs no Python code.
                        if ffi::PyDict_SetItem(d.as_ptr(), k, v.as_ptr()) != 0 {
                            return Err(PyErr::fetch(py));
                        }
                    }
                    Ok(d.into_any())
                }
                _ => Err(corrupt()),
            }
        }
    }
}

/// Addresses of the objects met so far: a few inline, then an open-addressing hash set.
///
/// The set is the one pickle's own memo uses for the same job (object addresses as keys): a
/// power-of-two table probed linearly from a multiplicative hash, at most half full, 0 marking
/// a free slot (address 0 itself is kept aside). A general hash set with a keyed hasher cost
/// `set` of a large value a sixth of its time (seeding, hashing and growing it), and a walk
/// only ever inserts; addresses are not chosen by whoever supplies the value, so nothing
/// floods a bucket on purpose.
#[derive(Default)]
struct Seen {
    few: [usize; 8],
    len: usize,
    /// Empty until the inline slots overflow.
    table: Vec<usize>,
    /// Addresses in `table`, and whether address 0 was met (it cannot be kept there).
    count: usize,
    zero: bool,
}

impl Seen {
    /// False if `p` was already met.
    fn insert(&mut self, p: usize) -> bool {
        if self.table.is_empty() {
            if self.few[..self.len].contains(&p) {
                return false;
            }
            if self.len < self.few.len() {
                self.few[self.len] = p;
                self.len += 1;
                return true;
            }
            self.grow(256);
            for q in self.few {
                self.put(q);
            }
        }
        if self.count * 2 >= self.table.len() {
            self.grow(self.table.len() * 2);
        }
        self.put(p)
    }

    /// Puts `p` into the table (which has a free slot); false if it was there.
    fn put(&mut self, p: usize) -> bool {
        if p == 0 {
            return !std::mem::replace(&mut self.zero, true);
        }
        let mask = self.table.len() - 1;
        let mut i = spread(p) & mask;
        loop {
            match self.table[i] {
                0 => {
                    self.table[i] = p;
                    self.count += 1;
                    return true;
                }
                q if q == p => return false,
                _ => i = (i + 1) & mask,
            }
        }
    }

    /// Moves the table's addresses into a new one of `size` slots (a power of two).
    fn grow(&mut self, size: usize) {
        let old = std::mem::replace(&mut self.table, vec![0; size]);
        self.count = 0;
        for p in old.into_iter().filter(|&p| p != 0) {
            self.put(p);
        }
    }
}

/// An address's slot index before masking: a 128-bit multiply folded in two, which spreads the
/// address's middle bits (objects are 16-byte aligned, their high bits mostly alike) into the
/// low ones.
#[inline]
fn spread(p: usize) -> usize {
    let m = u128::from(p as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((m as u64) ^ ((m >> 64) as u64)) as usize
}

struct Walk {
    seen: Seen,
    /// Addresses of the shared atoms charged so far (one met twice is charged once).
    atoms: Seen,
    /// Objects counted so far (containers count their items before walking them).
    nodes: usize,
    /// The value walked (alive: the caller of `classify` holds it), and whether it was
    /// counted (see `COUNT_AT`).
    root: *mut ffi::PyObject,
    counted: bool,
    /// Tuples on the path from the root to the object walked that may be met more than once
    /// (tuples are not remembered: see `first_meeting`).
    in_repeated: usize,
    /// Bytes held so far: atoms' object sizes, Python dicts held, instances' boxes (the words
    /// are charged at the end).
    weight: usize,
    /// The plain classes met so far (instances of one class share its `Class`).
    classes: Vec<Arc<Class>>,
    /// The stored form written so far (see `Flat`).
    out: Words,
}

impl Walk {
    /// What keeping the atom `p` (of `size` bytes; `held`: the references the walk itself holds
    /// on it) adds: its share if CPython keeps it alive anyway (see `sizes::cached`), else all of
    /// it, once per value if it is larger than `SMALL_ATOM` (an object held by others may be met
    /// again in this value).
    ///
    /// # Safety
    /// `p` must be a live object and the GIL held.
    #[inline]
    unsafe fn keep(&mut self, p: *mut ffi::PyObject, held: isize, size: usize) -> usize {
        if size == 0 {
            return 0;
        }
        // Held only by its container (and the walk): met once in this value. (Were it one that
        // CPython keeps alive, its share would be all of it as well: it has one holder.)
        if ffi::Py_REFCNT(p) - held <= 1 {
            return size;
        }
        if sizes::cached(p, ffi::Py_TYPE(p)) {
            return sizes::share(p, held, size);
        }
        // A small atom is charged again each time it is met rather than looked up: the lookup
        // (every atom of a value stored twice, or read from the store, modified and stored
        // again, has another holder) cost a large `set` a sixth of its time, and the excess is
        // bounded by `SMALL_ATOM` a place holding it (a word of 8 bytes, 16 with a key).
        if size <= SMALL_ATOM || self.atoms.insert(p as usize) {
            size
        } else {
            0
        }
    }

    /// Reserves `len` more objects; false past `MAX_NODES`.
    fn reserve(&mut self, len: usize) -> bool {
        self.nodes += len;
        if self.nodes > COUNT_AT && !self.counted {
            self.counted = true;
            // SAFETY: the root is alive (see `root`) and the GIL is held.
            if unsafe { count(self.root, 0, 1) } > MAX_NODES {
                return false;
            }
        }
        self.nodes <= MAX_NODES
    }

    /// Whether the list or dict `p`, which the walk holds one reference to (`v` of `value`), is
    /// met for the first time in this value: false if it was met before (shared, or a cycle).
    ///
    /// An object held by one place alone (nearly every container of a value built for the
    /// cache) is not remembered at all, which spares the hash set its inserts: each place it is
    /// met at holds a reference (a container's slot, or the caller's for the root), so it is
    /// met once if that one place is. Lists, dicts and instances are met once (or refused when
    /// met again), but a tuple is not remembered: under a tuple that may be met twice (held by
    /// more than one place itself, or under another such tuple), everything is remembered.
    ///
    /// # Safety
    /// `p` must be a live object and the GIL held.
    unsafe fn first_meeting(&mut self, p: *mut ffi::PyObject) -> bool {
        (self.in_repeated == 0 && ffi::Py_REFCNT(p) <= 2) || self.seen.insert(p as usize)
    }

    /// Writes the stored form of `v` (at `depth`) to `out`, or gives None if `v` is not plain.
    /// `v` is a reference of the walk's own (not a holder: see `first_meeting`); an atom's word
    /// keeps it.
    #[inline(always)]
    fn value(&mut self, v: Bound<'_, PyAny>, depth: usize) -> Option<()> {
        let p = v.as_ptr();
        // SAFETY: `p` is alive while `v` is, and the GIL is held.
        if let Some(size) = unsafe { scalar_size(p) } {
            self.weight += unsafe { self.keep(p, 1, size?) };
            return self.atom(v);
        }
        let t = unsafe { ffi::Py_TYPE(p) };
        if t == addr_of_mut!(ffi::PyTuple_Type) {
            self.tuple(v, depth)
        } else if t == addr_of_mut!(ffi::PyList_Type) {
            self.list(&v, depth)
        } else if t == addr_of_mut!(ffi::PyDict_Type) {
            self.dict(&v, depth)
        } else if unsafe { instance::candidate(t) } {
            self.instance(&v, depth)
        } else {
            None
        }
    }

    /// Writes an owned reference (`tag` `ATOM` or `DICT`); None for an object whose address
    /// leaves no room for the tag (none that CPython allocates).
    #[inline(always)]
    fn own(&mut self, o: *mut ffi::PyObject, tag: usize) -> Option<()> {
        let w = o as usize;
        if w & TAG != 0 {
            // SAFETY: `o` is an owned reference handed to the walk, dropped here instead.
            unsafe { ffi::Py_DecRef(o) };
            return None;
        }
        self.out.0.push(w | tag);
        Some(())
    }

    #[inline(always)]
    fn atom(&mut self, v: Bound<'_, PyAny>) -> Option<()> {
        self.own(v.into_ptr(), ATOM)
    }

    /// Whether the words from `at` on are one atom.
    #[inline(always)]
    fn one_atom(&self, at: usize) -> bool {
        self.out.0.len() == at + 1 && self.out.0[at] & TAG == ATOM
    }

    /// The shared `Class` of a qualifying class (made, and weighed, at its first instance).
    fn class(&mut self, v: &Bound<'_, PyAny>) -> Option<Arc<Class>> {
        let t = v.get_type();
        if let Some(c) = self.classes.iter().find(|c| c.ptr() == t.as_ptr()) {
            return Some(Arc::clone(c));
        }
        let c = Class::of(&t)?;
        // Its share: stored instances of earlier `set`s may hold the same `Class`. Charging all
        // of it to every instance would count a record (~200 bytes) once per entry (measured:
        // 1.6 times the resident growth of 150,000 stored instances); a share falls short once
        // earlier holders go, by less than one record per record alive: per class the program
        // defines, not per entry.
        self.weight += c.weight() / Arc::strong_count(&c);
        self.classes.push(Arc::clone(&c));
        Some(c)
    }

    /// An instance of a plain class: its class and a copy of its `__dict__`, whose keys are
    /// atoms (none a dunder name, interned if `str`) and whose values are plain. The instance and
    /// its dict both count as met (pickle keeps either's identity).
    fn instance(&mut self, v: &Bound<'_, PyAny>, depth: usize) -> Option<()> {
        let py = v.py();
        let p = v.as_ptr();
        if depth >= MAX_DEPTH || !self.seen.insert(p as usize) {
            return None;
        }
        let class = self.class(v)?;
        // SAFETY: GenericGetDict returns a new reference to the instance dict (made if the
        // instance had none yet, as pickle's `object.__reduce_ex__` makes it), or NULL.
        let d = unsafe {
            let d = ffi::PyObject_GenericGetDict(p, std::ptr::null_mut());
            if d.is_null() {
                ffi::PyErr_Clear();
                return None;
            }
            Bound::from_owned_ptr(py, d)
        };
        let dp = d.as_ptr();
        if unsafe { ffi::Py_TYPE(dp) } != addr_of_mut!(ffi::PyDict_Type)
            || !self.seen.insert(dp as usize)
        {
            return None;
        }
        let len = unsafe { ffi::PyDict_Size(dp) } as usize;
        if !self.reserve(2 * len) {
            return None;
        }
        // A box is aligned to its 8-byte fields: the tag bits are free.
        let boxed = Box::into_raw(Box::new(Instance { class })) as usize;
        self.out.0.push(boxed | INSTANCE);
        self.out.0.push(len << 3 | MAP);
        self.items(py, dp, len, depth, true)?;
        self.weight += malloc_chunk(size_of::<Instance>());
        Some(())
    }

    fn tuple(&mut self, v: Bound<'_, PyAny>, depth: usize) -> Option<()> {
        let py = v.py();
        let p = v.as_ptr();
        // SAFETY: `p` is an exact tuple; its items are fixed, so borrowed items stay alive while
        // the tuple does, and each is turned into an owned reference before anything else runs.
        let len = unsafe { ffi::PyTuple_Size(p) } as usize;
        if depth >= MAX_DEPTH || !self.reserve(len) {
            return None;
        }
        let before = self.weight;
        let start = self.out.0.len();
        self.out.0.push(len << 3 | TUPLE);
        let mut atoms = true;
        // Held by another place than its parent's slot (and `v`): it may be met again, and so
        // may the containers in it (see `first_meeting`). A walk that fails is dropped whole, so
        // the count needs no undoing on the way out then.
        let repeated = unsafe { ffi::Py_REFCNT(p) } > 2;
        self.in_repeated += usize::from(repeated);
        for i in 0..len {
            let item = unsafe { Bound::from_borrowed_ptr(py, ffi::PyTuple_GetItem(p, i as _)) };
            let at = self.out.0.len();
            self.value(item, depth + 1)?;
            atoms &= self.one_atom(at);
        }
        self.in_repeated -= usize::from(repeated);
        if !atoms {
            return Some(());
        }
        // Immutable all the way down: keep the tuple itself (its items' words go), untracked as
        // CPython's GC would leave it after its first collection (it cannot be part of a cycle).
        self.out.truncate(start);
        // SAFETY: `p` is alive (held by `v`, which is not a holder).
        match unsafe { self.keep(p, 1, sizes::tuple_size(len)) } {
            // Charged already in this value, or kept alive by CPython: so are its items.
            0 => self.weight = before,
            w => self.weight += w,
        }
        // SAFETY: untracking a tracked tuple of atoms is what the GC itself does.
        unsafe {
            if ffi::PyObject_GC_IsTracked(p) == 1 {
                ffi::PyObject_GC_UnTrack(p.cast());
            }
        }
        self.atom(v)
    }

    fn list(&mut self, v: &Bound<'_, PyAny>, depth: usize) -> Option<()> {
        let py = v.py();
        let p = v.as_ptr();
        let len = unsafe { ffi::PyList_Size(p) } as usize;
        // SAFETY: `p` is alive (held by `v`) and the GIL is held.
        if depth >= MAX_DEPTH || !self.reserve(len) || !unsafe { self.first_meeting(p) } {
            return None;
        }
        // Room for the items' words (a container's items hold one word each at least): a long
        // list of dicts of scalars grew the buffer a dozen times.
        self.out.0.reserve(len + 1);
        self.out.0.push(len << 3 | LIST);
        for i in 0..len {
            // SAFETY: the borrowed item becomes an owned reference at once; an index the list
            // no longer has gives NULL, and the value then goes to pickle.
            let item = unsafe {
                let raw = ffi::PyList_GetItem(p, i as _);
                if raw.is_null() {
                    ffi::PyErr_Clear();
                    return None;
                }
                Bound::from_borrowed_ptr(py, raw)
            };
            self.value(item, depth + 1)?;
        }
        if unsafe { ffi::PyList_Size(p) } as usize != len {
            return None;
        }
        Some(())
    }

    /// Writes the items of the exact dict `p` (`len` long, its header written): each key must
    /// be an atom (a tuple holding a list is unhashable); for an instance's state (`state`), one
    /// that `instance::plain_key` accepts, kept interned; each value must be plain. `None` if an
    /// item is not, or if the dict changed size meanwhile.
    fn items(
        &mut self,
        py: Python<'_>,
        p: *mut ffi::PyObject,
        len: usize,
        depth: usize,
        state: bool,
    ) -> Option<()> {
        let mut n = 0;
        let mut pos: ffi::Py_ssize_t = 0;
        loop {
            let mut k: *mut ffi::PyObject = std::ptr::null_mut();
            let mut val: *mut ffi::PyObject = std::ptr::null_mut();
            // SAFETY: PyDict_Next hands out borrowed references, made owned at once; it checks
            // `pos` against the table, so it stays in bounds even if the dict changed.
            let (k, val) = unsafe {
                if ffi::PyDict_Next(p, &mut pos, &mut k, &mut val) == 0 {
                    break;
                }
                (
                    Bound::from_borrowed_ptr(py, k),
                    Bound::from_borrowed_ptr(py, val),
                )
            };
            let at = self.out.0.len();
            self.value(k, depth + 1)?;
            if !self.one_atom(at) {
                return None;
            }
            if state {
                // SAFETY: the word is the owned reference `value` just wrote: taken back.
                let key = unsafe { Bound::from_owned_ptr(py, self.out.0.pop()? as _) };
                if !instance::plain_key(&key) {
                    return None;
                }
                self.atom(instance::intern_key(key).into_bound(py))?;
            }
            self.value(val, depth + 1)?;
            n += 1;
        }
        if n != len || unsafe { ffi::PyDict_Size(p) } as usize != len {
            return None;
        }
        Some(())
    }

    fn dict(&mut self, v: &Bound<'_, PyAny>, depth: usize) -> Option<()> {
        let py = v.py();
        let p = v.as_ptr();
        let len = unsafe { ffi::PyDict_Size(p) } as usize;
        // SAFETY: `p` is alive (held by `v`) and the GIL is held.
        if depth >= MAX_DEPTH || !self.reserve(2 * len) || !unsafe { self.first_meeting(p) } {
            return None;
        }
        if let Some(flat) = self.flat_dict(py, p, len) {
            return flat;
        }
        self.out.0.reserve(2 * len + 1);
        self.out.0.push(len << 3 | MAP);
        self.items(py, p, len, depth, false)
    }

    /// The commonest value, a dict whose keys and values are all scalars: checked in one pass,
    /// then copied with `PyDict_Copy` (a copy of its table, not an insert per item). `None` if
    /// some key or value is not a scalar (the caller then walks the dict in full); `Some(None)`
    /// if it holds a scalar that cannot be stored.
    fn flat_dict(
        &mut self,
        py: Python<'_>,
        p: *mut ffi::PyObject,
        len: usize,
    ) -> Option<Option<()>> {
        let mut weight = 0;
        let mut str_keys = true;
        let mut pos: ffi::Py_ssize_t = 0;
        let mut k: *mut ffi::PyObject = std::ptr::null_mut();
        let mut v: *mut ffi::PyObject = std::ptr::null_mut();
        // SAFETY: PyDict_Next hands out borrowed references to live items of `p`; nothing but
        // the scalar checks (which run no Python code) happens before the copy.
        unsafe {
            // Every item a scalar first: a dict that is not flat is walked item by item, which
            // must find none of its atoms charged already (see `keep`).
            while ffi::PyDict_Next(p, &mut pos, &mut k, &mut v) != 0 {
                if !scalar_type(k) || !scalar_type(v) {
                    return None;
                }
            }
            pos = 0;
            while ffi::PyDict_Next(p, &mut pos, &mut k, &mut v) != 0 {
                str_keys &= ffi::Py_TYPE(k) == addr_of_mut!(ffi::PyUnicode_Type);
                let (Some(kw), Some(vw)) = (scalar_size(k), scalar_size(v)) else {
                    return None;
                };
                let (Some(kw), Some(vw)) = (kw, vw) else {
                    return Some(None);
                };
                weight += self.keep(k, 0, kw) + self.keep(v, 0, vw);
            }
            let Ok(d) = Bound::from_owned_ptr_or_err(py, ffi::PyDict_Copy(p)) else {
                return Some(None);
            };
            if ffi::PyDict_Size(d.as_ptr()) as usize != len {
                return Some(None);
            }
            // The copy's table is the source's when that is dense (at least 2/3 used), else a
            // compact one; charged as a compact one built by insertion (see `dict_size`).
            self.weight += weight + sizes::dict_size(py, len, str_keys);
            Some(self.own(untracked(d.cast_into_unchecked()).into_ptr(), DICT))
        }
    }
}

/// `so_far` plus the objects in `p` (at `depth`) as `Walk::reserve` counts them: a tuple's or
/// a list's items, a dict's keys and values; it stops past `MAX_NODES`. Never more than the
/// walk counts (instances, dict keys and what lies deeper than `MAX_DEPTH` are not counted), so
/// a value it finds past the bound is one the walk would refuse too: the walk and this count
/// meet a container met twice as often as each other (the walk then refuses it anyway), and the
/// walk counts every container it walks.
///
/// Runs no Python code and allocates nothing, so nothing can change the value meanwhile: the
/// items are read as borrowed references.
///
/// # Safety
/// `p` must be a live object and the GIL held.
unsafe fn count(p: *mut ffi::PyObject, depth: usize, so_far: usize) -> usize {
    let t = ffi::Py_TYPE(p);
    let mut n = so_far;
    if depth >= MAX_DEPTH {
        return n;
    }
    if t == addr_of_mut!(ffi::PyList_Type) || t == addr_of_mut!(ffi::PyTuple_Type) {
        let list = t == addr_of_mut!(ffi::PyList_Type);
        let len = if list {
            ffi::PyList_Size(p)
        } else {
            ffi::PyTuple_Size(p)
        };
        n += len.max(0) as usize;
        for i in 0..len {
            if n > MAX_NODES {
                break;
            }
            let item = if list {
                ffi::PyList_GetItem(p, i)
            } else {
                ffi::PyTuple_GetItem(p, i)
            };
            if item.is_null() {
                ffi::PyErr_Clear();
                break;
            }
            n = count(item, depth + 1, n);
        }
    } else if t == addr_of_mut!(ffi::PyDict_Type) {
        n += 2 * ffi::PyDict_Size(p).max(0) as usize;
        let mut pos: ffi::Py_ssize_t = 0;
        let mut k: *mut ffi::PyObject = std::ptr::null_mut();
        let mut v: *mut ffi::PyObject = std::ptr::null_mut();
        while n <= MAX_NODES && ffi::PyDict_Next(p, &mut pos, &mut k, &mut v) != 0 {
            n = count(v, depth + 1, n);
        }
    }
    n
}

/// A dict of scalars made ours, untracked by the GC. It can never be part of a cycle and nobody
/// else can reach it to change that; CPython 3.10-3.13 leave such a dict untracked already (when
/// its source was), and this untracks it on versions that do not.
fn untracked(d: Bound<'_, PyDict>) -> Py<PyDict> {
    // SAFETY: `d` is the store's own copy and holds only scalars; nobody else can reach it.
    unsafe {
        if ffi::PyObject_GC_IsTracked(d.as_ptr()) == 1 {
            ffi::PyObject_GC_UnTrack(d.as_ptr().cast());
        }
    }
    d.unbind()
}

/// Whether `p` is a scalar (see `scalar_size`).
///
/// # Safety
/// `p` must be a live object.
unsafe fn scalar_type(p: *mut ffi::PyObject) -> bool {
    let t = ffi::Py_TYPE(p);
    t == addr_of_mut!(ffi::PyUnicode_Type)
        || t == addr_of_mut!(ffi::PyLong_Type)
        || t == addr_of_mut!(ffi::PyBytes_Type)
        || t == addr_of_mut!(ffi::PyFloat_Type)
        || t == addr_of_mut!(ffi::PyBool_Type)
        || p == ffi::Py_None()
}

/// The size of a scalar (`str`, `bytes`, `int`, `float`, `bool`, `None`) inside a plain value:
/// `None` if `p` is not a scalar, `Some(None)` if it is one that cannot be stored (an int that
/// fails to convert), else the object's size (0 for the singletons), to charge with `Walk::keep`.
///
/// # Safety
/// `p` must be a live object and the GIL held.
unsafe fn scalar_size(p: *mut ffi::PyObject) -> Option<Option<usize>> {
    let t = ffi::Py_TYPE(p);
    let py = Python::assume_attached();
    let size = if t == addr_of_mut!(ffi::PyUnicode_Type) {
        sizes::str_size(py, p)
    } else if t == addr_of_mut!(ffi::PyLong_Type) {
        let mut overflow = 0;
        let i = ffi::PyLong_AsLongLongAndOverflow(p, &mut overflow);
        if overflow != 0 {
            big_int_weight(&Bound::from_borrowed_ptr(py, p))
        } else if i == -1 && !ffi::PyErr_Occurred().is_null() {
            ffi::PyErr_Clear();
            return Some(None);
        } else {
            sizes::int_size((64 - i.unsigned_abs().leading_zeros()) as usize)
        }
    } else if t == addr_of_mut!(ffi::PyBytes_Type) {
        sizes::bytes_size(ffi::PyBytes_Size(p) as usize)
    } else if t == addr_of_mut!(ffi::PyFloat_Type) {
        sizes::FLOAT_SIZE
    } else if p == ffi::Py_None() || t == addr_of_mut!(ffi::PyBool_Type) {
        0 // singletons: nothing held beyond the reference
    } else {
        return None;
    };
    Some(Some(size))
}

/// CPython's size of an int beyond 64 bits: 30 bits a 4-byte digit after a 24-byte header.
fn big_int_weight(v: &Bound<'_, PyAny>) -> usize {
    let bits: usize = v
        .call_method0("bit_length")
        .and_then(|b| b.extract())
        .unwrap_or(64);
    sizes::int_size(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seen_spots_repeats_before_and_after_growing() {
        let mut s = Seen::default();
        for p in 0..100 {
            assert!(s.insert(p * 8));
        }
        assert!(!s.insert(8));
        assert!(!s.insert(99 * 8));
        let mut few = Seen::default();
        assert!(few.insert(1) && few.insert(2) && !few.insert(1));
        // The 9th address moves them all to the set: repeats of the first 8 are still seen.
        let mut nine = Seen::default();
        for p in 1..=9 {
            assert!(nine.insert(p));
        }
        assert!((1..=9).all(|p| !nine.insert(p)));
    }

    #[test]
    fn seen_keeps_every_address_through_many_growths() {
        // Heap-like addresses (16-byte aligned, alike in their high bits), address 0, and repeats
        // of the first and last ones after each growth.
        let mut s = Seen::default();
        let base = 0x7f3a_1c00_0000usize;
        assert!(s.insert(0) && !s.insert(0));
        for i in 0..50_000 {
            let p = base + 16 * i;
            assert!(s.insert(p), "{i}");
            assert!(!s.insert(p) && !s.insert(base) && !s.insert(0));
        }
        assert!((0..50_000).all(|i| !s.insert(base + 16 * i)));
        assert_eq!(s.count, 50_000);
        assert!(s.count * 2 <= s.table.len());
        // Neighbours never met are new.
        assert!(s.insert(base + 8) && s.insert(base - 16) && s.insert(usize::MAX));
        assert!(!s.insert(usize::MAX));
    }
}
