//! Instances of plain classes, copied without pickle.
//!
//! `pickle.dumps(obj, 5)` of an instance whose class keeps every default of `object` writes the
//! class by name (`module.qualname`), `NEWOBJ` with no arguments and the instance's `__dict__`
//! as the state; `pickle.loads` then finds the class by that name, calls its `tp_new` with no
//! arguments and, unless the new instance has a `__setstate__`, puts the state's items into its
//! `__dict__` (exact `str` keys interned). This module decides, without running Python code,
//! when that is exactly what happens (`Class::of`), and rebuilds such instances the same way on
//! `get` (`build`), checking first that the name still leads to the stored class and that the
//! class still loads as it did; if not (after `importlib.reload`, say), the instance is made by
//! `pickle.loads` from the class's name and filled as pickle's `BUILD` would fill it.
//!
//! A class qualifies when (rules from CPython 3.10-3.13's `object.__reduce_ex__`, `copyreg` and
//! `_pickle.c`):
//! - its metaclass is exactly `type`, and every class of its MRO but `object` was made by a
//!   `class` statement (heap type, `subtype_dealloc`), without `__slots__`: the instance layout
//!   is exactly a plain class's (object, `__dict__`, `__weakref__`), which also catches slots
//!   whose `__slots__` was deleted afterwards (pickle refuses those);
//! - `__getattribute__`, `__getattr__` and `__new__` are object's (the type's slots say so);
//! - on the MRO, `__reduce_ex__`, `__reduce__`, `__class__` and (3.11+) `__getstate__` are
//!   object's own; `__setstate__`, `__getnewargs_ex__`, `__getnewargs__`, `__getstate__` (3.10)
//!   and `__slots__` are absent; `__dict__` is the descriptor the `class` statement made;
//!   `__slotnames__` (pickle's cache) is absent, `None` or empty;
//! - it is not in `copyreg.dispatch_table`, `copyreg._extension_registry` is empty and
//!   `copyreg.__newobj__` is the original;
//! - `__module__` and `__qualname__` are `str`, and `sys.modules[__module__]` followed by the
//!   qualname's parts (found in module and class dicts, no part a dunder) is the class itself.
//!
//! and an instance qualifies when its `__dict__` is an exact dict whose keys are atoms, none a
//! dunder name (an instance attribute named `__reduce_ex__` or `__getstate__` changes what
//! pickle does), and whose values are plain. Decided at `set`, as a stored pickle would have been:
//! a class changed afterwards in a way that only matters to `pickle.dumps` (a `__reduce__` added)
//! still gets back what was stored; changes that matter to `pickle.loads` (a `__setstate__`, a
//! `__new__`, a `__getattr__`, a new `__mro__`, another class under the name) are seen on `get`.

use std::ptr::addr_of_mut;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Weak};

use ahash::RandomState;
use hashbrown::HashMap;
use parking_lot::Mutex;

use pyo3::exceptions::PyAttributeError;
use pyo3::ffi;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyDict, PyString, PyTuple, PyType};

use super::plain::Reader;

/// A qualifying class as `set` found it; the stored instances of one class share it while the
/// class stays the same (see `known`).
pub struct Class {
    cls: Py<PyType>,
    module: Py<PyString>,
    qualname: Py<PyString>,
    /// The qualname's parts, interned.
    path: Box<[Py<PyString>]>,
    /// The `__dict__` descriptor found on the MRO at `set`.
    dict_descr: Py<PyAny>,
    /// The MRO but `object`, as it was at `set`.
    mro: Box<[Ancestor]>,
}

/// A class of a qualifying class's MRO: its `__bases__` at `set` (the MRO stays what it was
/// while none of its classes gets new bases) and its dict.
struct Ancestor {
    class: Py<PyAny>,
    bases: Py<PyAny>,
    dict: Py<PyDict>,
}

/// A stored instance: its class. A copy of its `__dict__` (keys interned, values plain) follows
/// it in the stored value's words (see `plain::Flat`).
pub struct Instance {
    pub class: Arc<Class>,
}

/// What the rules compare with, read once.
struct Refs {
    reduce_ex: Py<PyAny>,
    reduce: Py<PyAny>,
    class_attr: Py<PyAny>,
    /// object's `__getstate__` (3.11+), or None (3.10).
    getstate: Option<Py<PyAny>>,
    getset_type: Py<PyType>,
    /// `subtype_dealloc`, `object_new` and `PyObject_GenericGetAttr`, as slot values.
    subtype_dealloc: usize,
    object_new: usize,
    generic_getattr: usize,
    /// `__basicsize__`, `__itemsize__`, `__dictoffset__`, `__weakrefoffset__` of a plain class.
    layout: [isize; 4],
    dispatch_table: Py<PyDict>,
    extension_registry: Py<PyDict>,
    copyreg: Py<PyDict>,
    newobj: Py<PyAny>,
    empty: Py<PyTuple>,
    loads: Py<PyAny>,
    /// The plain class the slots and layout were read from (kept alive with them).
    _reference: Py<PyType>,
}

/// The rules' references, or None where they cannot be trusted (an interpreter whose `object`
/// has other pickle hooks, or whose class dicts are not where `type.__dictoffset__` says):
/// every instance is then pickled.
fn refs(py: Python<'_>) -> Option<&'static Refs> {
    static REFS: PyOnceLock<Option<Refs>> = PyOnceLock::new();
    REFS.get_or_init(py, || make_refs(py).ok().flatten())
        .as_ref()
}

fn make_refs(py: Python<'_>) -> PyResult<Option<Refs>> {
    let minor = py.version_info().minor;
    if !(10..=13).contains(&minor) {
        return Ok(None); // rules checked against these versions' sources only
    }
    let object = py.get_type::<pyo3::types::PyAny>(); // `object`
    let odict = object.getattr("__dict__")?;
    let get = |name: &str| -> PyResult<Option<Py<PyAny>>> {
        let v = odict.call_method1("get", (name,))?;
        Ok((!v.is_none()).then(|| v.unbind()))
    };
    for absent in [
        "__setstate__",
        "__getnewargs_ex__",
        "__getnewargs__",
        "__slots__",
    ] {
        if get(absent)?.is_some() {
            return Ok(None);
        }
    }
    let (Some(reduce_ex), Some(reduce), Some(class_attr)) =
        (get("__reduce_ex__")?, get("__reduce__")?, get("__class__")?)
    else {
        return Ok(None);
    };
    let getstate = get("__getstate__")?;
    if getstate.is_some() != (minor >= 11) {
        return Ok(None);
    }
    let builtins = py.import("builtins")?;
    let reference = builtins
        .getattr("type")?
        .call1(("_RustCachePlain", (), PyDict::new(py)))?
        .cast_into::<PyType>()?;
    let descr = reference.getattr("__dict__")?.get_item("__dict__")?;
    // The class dict `Class::dict` reads through `type.__dictoffset__` must be the real one.
    let real = py
        .import("gc")?
        .call_method1("get_referents", (reference.getattr("__dict__")?,))?
        .get_item(0)?;
    // SAFETY: `reference` is a heap type made just now, with its dict.
    let ours = unsafe { class_dict(py, reference.as_ptr()) };
    if ours.map(|d| d.as_ptr()) != Some(real.as_ptr()) {
        return Ok(None);
    }
    let slot =
        |t: &Bound<'_, PyType>, s| unsafe { ffi::PyType_GetSlot(t.as_ptr().cast(), s) as usize };
    let mut layout = [0isize; 4];
    for (i, name) in [
        "__basicsize__",
        "__itemsize__",
        "__dictoffset__",
        "__weakrefoffset__",
    ]
    .iter()
    .enumerate()
    {
        layout[i] = reference.getattr(*name)?.extract()?;
    }
    let copyreg = py.import("copyreg")?;
    let pickle = py.import("pickle")?;
    Ok(Some(Refs {
        reduce_ex,
        reduce,
        class_attr,
        getstate,
        getset_type: descr.get_type().unbind(),
        subtype_dealloc: slot(&reference, ffi::Py_tp_dealloc),
        object_new: slot(&object, ffi::Py_tp_new),
        generic_getattr: ffi::PyObject_GenericGetAttr as *const () as usize,
        layout,
        dispatch_table: copyreg
            .getattr("dispatch_table")?
            .cast_into::<PyDict>()?
            .unbind(),
        extension_registry: copyreg
            .getattr("_extension_registry")?
            .cast_into::<PyDict>()?
            .unbind(),
        copyreg: copyreg.dict().unbind(),
        newobj: copyreg.getattr("__newobj__")?.unbind(),
        empty: PyTuple::empty(py).unbind(),
        loads: pickle.getattr("loads")?.unbind(),
        _reference: reference.unbind(),
    }))
}

/// Reads the rules' references (at import, so that no walk runs Python code for them).
pub fn init(py: Python<'_>) {
    refs(py);
}

/// Cheap first test of a value's type: a heap type whose metaclass is exactly `type`.
///
/// # Safety
/// `t` must be a live type object and the GIL held.
pub unsafe fn candidate(t: *mut ffi::PyTypeObject) -> bool {
    ffi::Py_TYPE(t.cast()) == addr_of_mut!(ffi::PyType_Type)
        && ffi::PyType_GetFlags(t) & ffi::Py_TPFLAGS_HEAPTYPE != 0
}

/// A heap type's own `__dict__` (the real dict, not a mappingproxy): `type` keeps it at
/// `type.__dictoffset__`, which `PyObject_GenericGetDict` reads. `make_refs` checks this once.
///
/// # Safety
/// `t` must be a live heap type and the GIL held.
unsafe fn class_dict(py: Python<'_>, t: *mut ffi::PyObject) -> Option<Bound<'_, PyDict>> {
    let d = ffi::PyObject_GenericGetDict(t, std::ptr::null_mut());
    if d.is_null() {
        ffi::PyErr_Clear();
        return None;
    }
    let d = Bound::from_owned_ptr(py, d);
    (ffi::Py_TYPE(d.as_ptr()) == addr_of_mut!(ffi::PyDict_Type)).then(|| d.cast_into_unchecked())
}

/// `d[key]` as a new reference, or None (no error) if absent. Class, module and `sys.modules`
/// dicts have `str` keys: the lookup runs no Python code.
fn dict_get<'py>(d: &Bound<'py, PyDict>, key: &Bound<'py, PyString>) -> Option<Bound<'py, PyAny>> {
    // SAFETY: a borrowed item made an owned reference at once.
    unsafe {
        let v = ffi::PyDict_GetItemWithError(d.as_ptr(), key.as_ptr());
        if v.is_null() {
            ffi::PyErr_Clear();
            return None;
        }
        Some(Bound::from_borrowed_ptr(d.py(), v))
    }
}

/// A type slot as an address.
fn slot(t: &Bound<'_, PyAny>, s: std::ffi::c_int) -> usize {
    // SAFETY: `t` is a type (callers check); PyType_GetSlot reads any type's slots from 3.10 on.
    unsafe { ffi::PyType_GetSlot(t.as_ptr().cast(), s) as usize }
}

/// Classes of an MRO and their dicts.
type Mro<'py> = (Vec<Bound<'py, PyAny>>, Vec<Bound<'py, PyDict>>);

/// The classes of `cls.__mro__` but its last, which must be `object`, with their dicts; None if
/// some class of it was not made by a `class` statement.
fn mro_dicts<'py>(refs: &Refs, cls: &Bound<'py, PyAny>) -> Option<Mro<'py>> {
    let py = cls.py();
    // Reading `__mro__` of a class whose metaclass is exactly `type` runs type's C getter only.
    let mro = cls.getattr(intern!(py, "__mro__")).ok()?;
    let mro = mro.cast::<PyTuple>().ok()?;
    let n = mro.len();
    if n < 2 || mro.get_item(n - 1).ok()?.as_ptr() != addr_of_mut!(ffi::PyBaseObject_Type).cast() {
        return None;
    }
    let mut classes = Vec::with_capacity(n - 1);
    let mut dicts = Vec::with_capacity(n - 1);
    for k in mro.iter().take(n - 1) {
        // SAFETY: reading the type and flags of a live object; `k` is a type when its metaclass
        // is `type`.
        unsafe {
            if !candidate(k.as_ptr().cast()) {
                return None;
            }
        }
        if slot(&k, ffi::Py_tp_dealloc) != refs.subtype_dealloc {
            return None;
        }
        // SAFETY: `k` is a live heap type.
        dicts.push(unsafe { class_dict(py, k.as_ptr()) }?);
        classes.push(k);
    }
    Some((classes, dicts))
}

/// A type's `__bases__` tuple, as its slot holds it.
fn bases<'py>(t: &Bound<'py, PyAny>) -> Option<Bound<'py, PyAny>> {
    // SAFETY: `t` is a heap type; the slot is a borrowed reference, made owned at once.
    unsafe {
        let b = ffi::PyType_GetSlot(t.as_ptr().cast(), ffi::Py_tp_bases);
        (!b.is_null()).then(|| Bound::from_borrowed_ptr(t.py(), b.cast()))
    }
}

/// The first of `dicts` (an MRO's, in order) holding `name`, with the index of its class.
fn lookup<'py>(
    dicts: &[Bound<'py, PyDict>],
    name: &Bound<'py, PyString>,
) -> Option<(usize, Bound<'py, PyAny>)> {
    dicts
        .iter()
        .enumerate()
        .find_map(|(i, d)| dict_get(d, name).map(|v| (i, v)))
}

/// Whether `name`, looked up on the MRO's classes before `object`, is absent there (so found
/// on `object`) or is `object`'s own entry (`own`) itself.
fn is_objects<'py>(
    dicts: &[Bound<'py, PyDict>],
    name: &Bound<'py, PyString>,
    own: &Py<PyAny>,
) -> bool {
    match lookup(dicts, name) {
        None => true,
        Some((_, v)) => v.as_ptr() == own.as_ptr(),
    }
}

/// What `sys.modules[module]` and then the parts of `path` lead to, looked up in dicts only;
/// None where pickle's lookup could differ from that (or fail).
fn resolve<'py>(
    py: Python<'py>,
    module: &Bound<'py, PyString>,
    path: &[Py<PyString>],
) -> Option<Bound<'py, PyAny>> {
    // SAFETY: the interpreter's module dict (borrowed, alive while the interpreter is), and the
    // module dict of an exact module (borrowed from the module, which we hold).
    let mut cur = unsafe {
        let modules = Bound::from_borrowed_ptr(py, ffi::PyImport_GetModuleDict());
        let m = dict_get(modules.cast_unchecked::<PyDict>(), module)?;
        if ffi::Py_TYPE(m.as_ptr()) != addr_of_mut!(ffi::PyModule_Type) {
            return None; // a module subclass may resolve names its own way
        }
        let d = Bound::from_borrowed_ptr(py, ffi::PyModule_GetDict(m.as_ptr()));
        dict_get(d.cast_unchecked::<PyDict>(), path.first()?.bind(py))?
    };
    for part in &path[1..] {
        // SAFETY: `cur` is live; its dict is read only when it is a heap type.
        let d = unsafe {
            if !candidate(cur.as_ptr().cast()) {
                return None;
            }
            class_dict(py, cur.as_ptr())?
        };
        cur = dict_get(&d, part.bind(py))?;
    }
    Some(cur)
}

impl Class {
    /// The class of an instance if it qualifies (see the module's rules), shared with the
    /// stored instances of earlier `set`s while it is the same. Runs no Python code.
    pub fn of(t: &Bound<'_, PyType>) -> Option<Arc<Class>> {
        let py = t.py();
        let refs = refs(py)?;
        let cls = t.as_any();
        // SAFETY: `t` is a live type.
        if !unsafe { candidate(t.as_ptr().cast()) }
            || slot(cls, ffi::Py_tp_getattro) != refs.generic_getattr
            || slot(cls, ffi::Py_tp_new) != refs.object_new
        {
            return None;
        }
        for (i, name) in [
            intern!(py, "__basicsize__"),
            intern!(py, "__itemsize__"),
            intern!(py, "__dictoffset__"),
            intern!(py, "__weakrefoffset__"),
        ]
        .into_iter()
        .enumerate()
        {
            if cls.getattr(name).ok()?.extract::<isize>().ok()? != refs.layout[i] {
                return None;
            }
        }
        let (classes, dicts) = mro_dicts(refs, cls)?;
        for absent in [
            intern!(py, "__setstate__"),
            intern!(py, "__getnewargs_ex__"),
            intern!(py, "__getnewargs__"),
            intern!(py, "__slots__"),
        ] {
            if lookup(&dicts, absent).is_some() {
                return None;
            }
        }
        if !is_objects(&dicts, intern!(py, "__reduce_ex__"), &refs.reduce_ex)
            || !is_objects(&dicts, intern!(py, "__reduce__"), &refs.reduce)
            || !is_objects(&dicts, intern!(py, "__class__"), &refs.class_attr)
        {
            return None;
        }
        let getstate = intern!(py, "__getstate__");
        match &refs.getstate {
            Some(own) if !is_objects(&dicts, getstate, own) => return None,
            None if lookup(&dicts, getstate).is_some() => return None,
            _ => {}
        }
        let (at, dict_descr) = lookup(&dicts, intern!(py, "__dict__"))?;
        if !dict_descr.get_type().is(refs.getset_type.bind(py))
            || !dict_descr
                .getattr(intern!(py, "__objclass__"))
                .ok()?
                .is(&classes[at])
        {
            return None;
        }
        let own = &dicts[0];
        if let Some(names) = dict_get(own, intern!(py, "__slotnames__")) {
            // SAFETY: reading the length of a live list.
            let empty_list = names.is_instance_of::<pyo3::types::PyList>()
                && unsafe { ffi::PyList_Size(names.as_ptr()) } == 0;
            if !names.is_none() && !empty_list {
                return None;
            }
        }
        let module = dict_get(own, intern!(py, "__module__"))?
            .cast_into_exact::<PyString>()
            .ok()?;
        let qualname = cls
            .getattr(intern!(py, "__qualname__"))
            .ok()?
            .cast_into_exact::<PyString>()
            .ok()?;
        // The `Class` an earlier `set` made, if it describes the class as it is now.
        let known = known(py, t, &module, &qualname, &dict_descr, &classes, &dicts);
        let made = match known {
            Some(_) => None,
            None => {
                module.to_str().ok()?;
                Some(split(py, &qualname)?)
            }
        };
        let path: &[Py<PyString>] = match (&known, &made) {
            (Some(c), _) => &c.path,
            (None, Some(p)) => p,
            (None, None) => return None,
        };
        if !resolve(py, &module, path)?.is(cls) {
            return None;
        }
        let copyreg = refs.copyreg.bind(py);
        // SAFETY: a type hashes by identity (its metaclass is `type`): no Python code runs.
        if unsafe { ffi::PyDict_Contains(refs.dispatch_table.as_ptr(), t.as_ptr()) } != 0
            || !refs.extension_registry.bind(py).is_empty()
            || !dict_get(copyreg, intern!(py, "__newobj__"))?.is(refs.newobj.bind(py))
        {
            return None;
        }
        if known.is_some() {
            return known;
        }
        let mro = classes
            .iter()
            .zip(dicts)
            .map(|(k, d)| {
                Some(Ancestor {
                    bases: bases(k)?.unbind(),
                    class: k.clone().unbind(),
                    dict: d.unbind(),
                })
            })
            .collect::<Option<Box<[_]>>>()?;
        let class = Arc::new(Class {
            cls: t.clone().unbind(),
            module: module.unbind(),
            qualname: qualname.unbind(),
            path: made?,
            dict_descr: dict_descr.unbind(),
            mro,
        });
        remember(&class);
        Some(class)
    }

    /// The class itself.
    pub fn ptr(&self) -> *mut ffi::PyObject {
        self.cls.as_ptr()
    }

    /// Bytes a `Class` takes: the `Arc` block and its slices (the objects are the class's own).
    pub fn weight(&self) -> usize {
        crate::mem::malloc_chunk(16 + std::mem::size_of::<Class>()) + self.extra_weight()
    }

    fn extra_weight(&self) -> usize {
        crate::mem::malloc_chunk(self.path.len() * std::mem::size_of::<Py<PyString>>())
            + crate::mem::malloc_chunk(self.mro.len() * std::mem::size_of::<Ancestor>())
    }

    /// Whether `pickle.loads` would still make and fill an instance as `build`'s fast path does:
    /// the name leads to this class, which still has object's `__new__` and attribute lookup and
    /// (when there is a state to put in) no `__setstate__` and the same `__dict__`.
    fn current(&self, py: Python<'_>, refs: &Refs, with_state: bool) -> bool {
        let cls = self.cls.bind(py).as_any();
        if slot(cls, ffi::Py_tp_new) != refs.object_new
            || slot(cls, ffi::Py_tp_getattro) != refs.generic_getattr
            || !resolve(py, self.module.bind(py), &self.path).is_some_and(|c| c.is(cls))
        {
            return false;
        }
        if !with_state {
            return true;
        }
        // The MRO is the one of `set` while no class of it got new `__bases__` (each class of
        // it is on it, and a metaclass `type` computes it from the bases alone).
        let (setstate, dict) = (intern!(py, "__setstate__"), intern!(py, "__dict__"));
        let mut descr = None;
        for a in self.mro.iter() {
            if !bases(a.class.bind(py)).is_some_and(|b| b.is(a.bases.bind(py))) {
                return false;
            }
            let d = a.dict.bind(py);
            if dict_get(d, setstate).is_some() {
                return false;
            }
            if descr.is_none() {
                descr = dict_get(d, dict);
            }
        }
        descr.is_some_and(|d| d.is(self.dict_descr.bind(py)))
    }
}

/// The qualname's parts, interned; None if pickle could not find it by them as we do.
fn split(py: Python<'_>, qualname: &Bound<'_, PyString>) -> Option<Box<[Py<PyString>]>> {
    qualname
        .to_str()
        .ok()?
        .split('.')
        .map(|part| {
            (!part.is_empty() && !part.contains('<') && !dunder(part))
                .then(|| PyString::intern(py, part).unbind())
        })
        .collect()
}

/// The `Class`es stored instances hold, so that the instances of one class share one (made at
/// the first `set`, dropped with the last entry holding it). Only touched with the GIL held.
/// Keyed by the class's address (a live `Class` holds its class, so the address is its own).
static KNOWN: Mutex<Option<HashMap<usize, Weak<Class>, RandomState>>> = Mutex::new(None);

/// A live `Class` of `t` made from exactly these objects (the same name strings, `__dict__`
/// descriptor, MRO classes, their dicts and their current `__bases__`).
fn known(
    py: Python<'_>,
    t: &Bound<'_, PyType>,
    module: &Bound<'_, PyString>,
    qualname: &Bound<'_, PyString>,
    descr: &Bound<'_, PyAny>,
    classes: &[Bound<'_, PyAny>],
    dicts: &[Bound<'_, PyDict>],
) -> Option<Arc<Class>> {
    let c = KNOWN
        .lock()
        .as_ref()?
        .get(&(t.as_ptr() as usize))?
        .upgrade()?;
    let same = c.module.is(module)
        && c.qualname.is(qualname)
        && c.dict_descr.is(descr)
        && c.mro.len() == classes.len()
        && c.mro.iter().zip(classes).zip(dicts).all(|((a, k), d)| {
            a.class.is(k) && a.dict.is(d) && bases(k).is_some_and(|b| b.is(a.bases.bind(py)))
        });
    same.then_some(c)
}

/// fork's prepare step for `KNOWN` (see `crate::fork`): takes it and keeps it locked.
pub(crate) fn lock_for_fork() {
    std::mem::forget(KNOWN.lock());
}

/// Releases `KNOWN` after a fork.
///
/// # Safety
/// `lock_for_fork` took it in this thread (or in the thread of the parent that forked this child).
pub(crate) unsafe fn unlock_after_fork() {
    KNOWN.force_unlock();
}

/// `KNOWN` forgets dead records when it holds this many (then twice what it kept): amortized
/// O(1) a new record, where a fixed bound swept the whole map at every new record past it.
static SWEEP_AT: AtomicUsize = AtomicUsize::new(1024);

/// Keeps a new `Class` for the next `set`s (and forgets dead ones once there are many).
fn remember(class: &Arc<Class>) {
    let mut known = KNOWN.lock();
    let known = known.get_or_insert_with(HashMap::default);
    if known.len() >= SWEEP_AT.load(Relaxed) {
        known.retain(|_, w| w.strong_count() > 0);
        known.shrink_to(2 * known.len());
        SWEEP_AT.store((2 * known.len()).max(1024), Relaxed);
    }
    known.insert(class.cls.as_ptr() as usize, Arc::downgrade(class));
}

/// Whether `key` (an atom of an instance `__dict__`) may be copied: not a dunder name.
pub fn plain_key(key: &Bound<'_, PyAny>) -> bool {
    let Ok(s) = key.cast_exact::<PyString>() else {
        return true;
    };
    match s.to_str() {
        Ok(s) => !dunder(s),
        Err(_) => {
            // SAFETY: the UTF-8 attempt failed and set an exception; lone surrogates are fine.
            unsafe { ffi::PyErr_Clear() };
            true
        }
    }
}

/// Interns an exact `str` key as pickle's `BUILD` does (the stored key is then the one every
/// copy shares).
pub fn intern_key(key: Bound<'_, PyAny>) -> Py<PyAny> {
    if !key.is_exact_instance_of::<PyString>() {
        return key.unbind();
    }
    let mut p = key.into_ptr();
    // SAFETY: `p` is an owned reference to an exact str; InternInPlace replaces it with an owned
    // reference to the interned string.
    unsafe {
        ffi::PyUnicode_InternInPlace(&mut p);
        Bound::from_owned_ptr(Python::assume_attached(), p).unbind()
    }
}

/// A fresh instance from a stored one: what `pickle.loads` of its pickle gives. `state` reads
/// its state (the words that follow the instance's).
pub fn build<'py>(
    py: Python<'py>,
    inst: &Instance,
    state: &mut Reader<'_>,
) -> PyResult<Bound<'py, PyAny>> {
    let class = &inst.class;
    let len = state.map_len()?;
    let Some(refs) = refs(py) else {
        return slow(py, inst, len, state);
    };
    if !class.current(py, refs, len != 0) {
        return slow(py, inst, len, state);
    }
    // SAFETY: the class's tp_new is object_new (just checked), called as `NEWOBJ` calls it;
    // the new instance's dict is fetched (made) by PyObject_GenericGetDict, as `BUILD` gets it
    // through the standard `__dict__` descriptor, and filled with new references.
    unsafe {
        let new: ffi::newfunc = std::mem::transmute::<usize, ffi::newfunc>(refs.object_new);
        let obj = Bound::from_owned_ptr_or_err(
            py,
            new(
                class.ptr().cast(),
                refs.empty.as_ptr(),
                std::ptr::null_mut(),
            ),
        )?;
        if len == 0 {
            return Ok(obj);
        }
        let d = Bound::from_owned_ptr_or_err(
            py,
            ffi::PyObject_GenericGetDict(obj.as_ptr(), std::ptr::null_mut()),
        )?;
        for _ in 0..len {
            let k = state.atom(py)?;
            let v = state.value(py)?;
            if ffi::PyObject_SetItem(d.as_ptr(), k.as_ptr(), v.as_ptr()) != 0 {
                return Err(PyErr::fetch(py));
            }
        }
        Ok(obj)
    }
}

/// `pickle.loads` semantics when the class is no longer what was stored: the instance is what
/// unpickling `module.qualname` with `NEWOBJ` gives (pickle's own lookup, checks and errors);
/// then its `__setstate__`, if it has one, gets the state, else its `__dict__` the items.
fn slow<'py>(
    py: Python<'py>,
    inst: &Instance,
    len: usize,
    items: &mut Reader<'_>,
) -> PyResult<Bound<'py, PyAny>> {
    let class = &inst.class;
    let data = newobj_pickle(
        class.module.bind(py).to_str()?,
        class.qualname.bind(py).to_str()?,
    );
    let loads = match refs(py) {
        Some(r) => r.loads.bind(py).clone(),
        None => py.import("pickle")?.getattr("loads")?,
    };
    let obj = loads.call1((PyBytes::new(py, &data),))?;
    if len == 0 {
        return Ok(obj);
    }
    // The state as the unpickler makes it: keys are new strings, not the interned ones we keep.
    let state = PyDict::new(py);
    let mut keys = Vec::with_capacity(len);
    for _ in 0..len {
        let k = items.atom(py)?;
        state.set_item(unpickled_key(&k)?, items.value(py)?)?;
        keys.push(k);
    }
    match obj.getattr(intern!(py, "__setstate__")) {
        Ok(setstate) => {
            setstate.call1((state,))?;
        }
        Err(e) if e.is_instance_of::<PyAttributeError>(py) => {
            // BUILD's default: items into `__dict__`, exact str keys interned (ours are).
            let d = obj.getattr(intern!(py, "__dict__"))?;
            for (k, v) in keys.iter().zip(state.values()) {
                d.set_item(k, v)?;
            }
        }
        Err(e) => return Err(e),
    }
    Ok(obj)
}

/// The pickle (protocol 5) of `module.qualname.__new__(module.qualname)`, as `pickle.dumps`
/// writes the start of an instance: the class by name (`STACK_GLOBAL`), then `NEWOBJ` with no
/// arguments.
fn newobj_pickle(module: &str, qualname: &str) -> Vec<u8> {
    let mut data = vec![0x80, 5]; // PROTO 5
    for s in [module.as_bytes(), qualname.as_bytes()] {
        match u8::try_from(s.len()) {
            Ok(n) => data.extend_from_slice(&[0x8c, n]), // SHORT_BINUNICODE
            Err(_) => {
                data.push(b'X'); // BINUNICODE
                data.extend_from_slice(&(s.len() as u32).to_le_bytes());
            }
        }
        data.extend_from_slice(s);
    }
    data.extend_from_slice(&[0x93, b')', 0x81, b'.']); // STACK_GLOBAL, EMPTY_TUPLE, NEWOBJ, STOP
    data
}

/// A dunder name (`__x__`): as an instance attribute or a qualname part, it sends a value to
/// pickle (it may be a hook, or a descriptor of `type` or `module` that shadows the lookup).
fn dunder(s: &str) -> bool {
    s.len() >= 4 && s.starts_with("__") && s.ends_with("__")
}

/// A key as the unpickler reads it: an exact `str` decoded anew from its UTF-8 form (with
/// surrogates passed through, as pickle writes them), anything else as is.
fn unpickled_key<'py>(k: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    if !k.is_exact_instance_of::<PyString>() {
        return Ok(k.clone());
    }
    let py = k.py();
    let utf8 = k.call_method1(intern!(py, "encode"), ("utf-8", "surrogatepass"))?;
    utf8.call_method1(intern!(py, "decode"), ("utf-8", "surrogatepass"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dunder_names_are_told_apart() {
        assert!(dunder("__reduce_ex__") && dunder("____") && dunder("__x__"));
        assert!(!dunder("__") && !dunder("___") && !dunder("__init") && !dunder("x__"));
        assert!(!dunder("_private_") && !dunder("name"));
    }

    #[test]
    fn newobj_pickle_names_the_class_short_or_long() {
        let short = newobj_pickle("m", "A.B");
        assert_eq!(
            short,
            [
                &[0x80, 5, 0x8c, 1][..],
                b"m",
                &[0x8c, 3],
                b"A.B",
                &[0x93, b')', 0x81, b'.']
            ]
            .concat()
        );
        let name = "x".repeat(300);
        let long = newobj_pickle(&name, "C");
        assert_eq!(&long[2..7], &[b'X', 44, 1, 0, 0]); // 300 = 0x012c, little-endian
        assert_eq!(&long[7..307], name.as_bytes());
        assert_eq!(&long[307..], &[0x8c, 1, b'C', 0x93, b')', 0x81, b'.']);
    }
}
