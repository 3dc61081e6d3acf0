/*
 * ipc/prims/trace.c -- the trace ring (ipc/trace/) and the Traced* lock / reader types.
 *
 * One event ring per process in shared memory; this process writes only its own (attached with
 * trace_attach).  Declared once in ipc/trace/__init__.py (fields()); word layout:
 *   ring header (8 words, one line per process)
 *     [0] head      events ever written (the next sequence number); release-stored after the event
 *     [1] pid       of the writer (trace_attach)
 *     [2] nevents   ring capacity
 *   ring events (nevents x TR_EV_WORDS words)
 *     [0] ts        the raw stats clock, cyc() (ipc/trace/ converts every ring with one
 *                   calibration, trace_clock(): cross-process order is the clock's own)
 *     [1] code      (category << 40) | (phase << 32) | name id (interned in the ring's name table)
 *     [2] a, [3] b  arguments
 * Event sequence s lives at slot s % nevents; the oldest is overwritten.
 *
 * Traced lock / RCU reader types (TracedSpinLock, TracedMutex, TracedRwLock, TracedRcuReader) are
 * subtypes of the plain ones: ipc/locks.py and ipc/rcu.py choose them at object creation when
 * tracing is on, so the plain types' paths stay untouched when it is off (their slow paths test
 * one flag).  Their events: lock wait begin (stamped with the slow path's own t0) / wait end, hold
 * begin (acquired, a = waited, 2 = recover()ed from a dead holder) / hold end (by the holder only,
 * before the release store, so a waiter's acquisition is always later); RCU read section begin /
 * end at the outermost lock / unlock only; TracedRwLock's read side: the same wait and hold events
 * with argument b = 1 (outermost read section only).  ``trace_id`` names the object (a name id);
 * it defaults to its word index.
 */
#include "prims.h"
#include "structmember.h"

static MemObject *tr_mem;       /* the attached ring's Mem (a reference), NULL = tracing off */
static int64_t *tr_hdr, *tr_ev;
static uint64_t tr_n, tr_head;  /* capacity; head kept here (the shm copy is only published) */

/* one event stamped with the stats-clock reading c (raw: ipc/trace/ converts every ring with
 * one calibration, so events of different processes keep the clock's own order) */
static inline void tr_put_at(int64_t c, int64_t code, int64_t a, int64_t b) {
    if (!tr_mem || !__builtin_expect(tr_mem->has_view, 1)) return;
    uint64_t h = tr_head++;
    int64_t *e = &tr_ev[(h % tr_n) * TR_EV_WORDS];
    STR(&e[0], c);
    STR(&e[1], code);
    STR(&e[2], a);
    STR(&e[3], b);
    ST(&tr_hdr[0], (int64_t)tr_head);
}

static inline void tr_put(int64_t code, int64_t a, int64_t b) { tr_put_at(cyc(), code, a, b); }

/* ------------------------------------------------------------------ module functions */

/* trace_attach(mem, header_index, events_index, nevents): this process' ring (None detaches) */
PyObject *m_trace_attach(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs == 1 && args[0] == Py_None) {
        Py_CLEAR(tr_mem);
        Py_RETURN_NONE;
    }
    CHECK_NARGS(4, "trace_attach");
    if (!PyObject_TypeCheck(args[0], &MemType)) { PyErr_SetString(PyExc_TypeError, "need Mem"); return NULL; }
    MemObject *m = (MemObject *)args[0];
    int64_t hi, ei, n;
    if (get_i64(args[1], &hi) < 0 || get_i64(args[2], &ei) < 0 || get_i64(args[3], &n) < 0) return NULL;
    if (n < 1) { PyErr_SetString(PyExc_ValueError, "trace_attach: nevents < 1"); return NULL; }
    Py_ssize_t span = words_span(n, TR_EV_WORDS, "trace events");  /* n * 4 must not wrap */
    if (span < 0) return NULL;
    int64_t *h = mem_word_at(m, hi, 8, "trace header");
    int64_t *e = h ? mem_word_at(m, ei, span, "trace events") : NULL;
    if (!e) return NULL;
    Py_INCREF(m);
    Py_XSETREF(tr_mem, m);
    tr_hdr = h;
    tr_ev = e;
    tr_n = (uint64_t)n;
    tr_head = (uint64_t)LDR(&h[0]);
    STR(&h[1], HI32(g_pid_hi));
    STR(&h[2], n);
    Py_RETURN_NONE;
}

/* trace_clock() -> (cycles?, anchor cycles, anchor ns, ns per cycle * 2**32): the calibration
 * (just re-anchored) that turns the rings' raw stamps into CLOCK_MONOTONIC ns */
PyObject *m_trace_clock(PyObject *mod, PyObject *unused) {
    if (clk_kind != CLK_CYC) return Py_BuildValue("(iLLK)", 0, 0LL, 0LL, (unsigned long long)1 << 32);
    cyc_abs_slow(cyc());
    return Py_BuildValue("(iLLK)", 1, (long long)clk_anchor_cyc, (long long)clk_anchor_ns,
                         (unsigned long long)clk_mult);
}

/* trace_emit(code, a=0, b=0): one event into this process' ring (nothing when none is attached) */
PyObject *m_trace_emit(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    int64_t v[3] = {0, 0, 0};
    if (nargs < 1 || nargs > 3) { PyErr_SetString(PyExc_TypeError, "trace_emit(code, a=0, b=0)"); return NULL; }
    for (Py_ssize_t i = 0; i < nargs; i++)
        if (get_i64(args[i], &v[i]) < 0) return NULL;
    tr_put(v[0], v[1], v[2]);
    Py_RETURN_NONE;
}

/* ---- traced objects: the plain object, then the name id it has in the trace (member trace_id) */
#define TRACED_STRUCT(T, BASE, MEMBERS, DEFAULT)                                                  \
    typedef struct {                                                                              \
        BASE base;                                                                                \
        long long trace_id;                                                                       \
    } T;                                                                                          \
    static PyMemberDef MEMBERS[] = {                                                              \
        {"trace_id", T_LONGLONG, offsetof(T, trace_id), 0, "name id in the trace (default: " DEFAULT ")"}, \
        {NULL}};

TRACED_STRUCT(TLockObject, LockObject, tlock_members, "lock word")
TRACED_STRUCT(TReaderObject, ReaderObject, treader_members, "header word")

/* ---- traced locks: the plain lock(), whose slow path calls tr_wait_begin where its wait starts
 * (the same single CAS on the fast path and the same lock_stat accounting as the plain types) */

/* per object, not global: a signal handler run while waiting may take another traced lock */
void tr_wait_begin(LockObject *self, int64_t t0) {
    self->tr_waited = 1;
    tr_put_at(t0, TR_CODE(TR_CAT_WAIT, TR_PH_B, ((TLockObject *)self)->trace_id), 0, 0);
}

typedef PyObject *(*lock_fn)(LockObject *, PyObject *const *, Py_ssize_t);
typedef PyObject *(*trylock_fn)(LockObject *, PyObject *); /* also is_held, unlock */

static PyObject *tlock_common(TLockObject *self, PyObject *const *args, Py_ssize_t nargs, lock_fn lockf) {
    int64_t id = self->trace_id;
    int saved = self->base.tr_waited;  /* a hook may run lock() on this object meanwhile */
    self->base.tr_waited = 0;
    PyObject *r = lockf((LockObject *)self, args, nargs);
    int waited = self->base.tr_waited;
    self->base.tr_waited = saved;
    if (waited) tr_put(TR_CODE(TR_CAT_WAIT, TR_PH_E, id), r == Py_True, 0);
    if (r == Py_True) tr_put(TR_CODE(TR_CAT_HOLD, TR_PH_B, id), waited, 0);
    return r;
}

static PyObject *ttrylock_common(TLockObject *self, trylock_fn tryl) {
    PyObject *r = tryl((LockObject *)self, NULL);
    if (r == Py_True) tr_put(TR_CODE(TR_CAT_HOLD, TR_PH_B, self->trace_id), 0, 0);
    return r;
}

/* a takeover from a dead holder starts a hold (argument a = 2: recovered) */
static PyObject *tlock_recover(TLockObject *self, PyObject *const *args, Py_ssize_t nargs, lock_fn recf) {
    PyObject *r = recf((LockObject *)self, args, nargs);
    if (r == Py_True) tr_put(TR_CODE(TR_CAT_HOLD, TR_PH_B, self->trace_id), 2, 0);
    return r;
}

/* the hold ends only if unlock() will release it (this tag in this process holds it) */
static PyObject *tlock_unlock(TLockObject *self, trylock_fn is_held, trylock_fn unlockf) {
    if (self->base.mem && self->base.mem->has_view) {
        PyObject *h = is_held((LockObject *)self, NULL);
        if (h == Py_True) tr_put(TR_CODE(TR_CAT_HOLD, TR_PH_E, self->trace_id), 0, 0);
        Py_XDECREF(h);
    }
    return unlockf((LockObject *)self, NULL);
}

/* TracedSpinLock, TracedMutex and TracedRwLock: the same wrappers around spin_*, mutex_* and rw_*
 * (EXTRA: more entries of the method table) */
#define spin_recover lock_recover
#define mutex_recover lock_recover
#define TRACED_LOCK(P, NAME, EXTRA)                                                               \
    static int t##P##_init(TLockObject *self, PyObject *args, PyObject *kw) {                     \
        if (P##_init((LockObject *)self, args, kw) < 0) return -1;                                \
        self->base.traced = 1;                                                                    \
        self->trace_id = self->base.lk - self->base.mem->base;                                    \
        return 0;                                                                                 \
    }                                                                                             \
    static PyObject *t##P##_lock(TLockObject *self, PyObject *const *args, Py_ssize_t nargs) {    \
        return tlock_common(self, args, nargs, P##_lock);                                         \
    }                                                                                             \
    static PyObject *t##P##_trylock(TLockObject *self, PyObject *u) {                             \
        return ttrylock_common(self, P##_trylock);                                                \
    }                                                                                             \
    static PyObject *t##P##_unlock(TLockObject *self, PyObject *u) {                              \
        return tlock_unlock(self, P##_is_held, P##_unlock);                                       \
    }                                                                                             \
    static PyObject *t##P##_exit(TLockObject *self, PyObject *const *args, Py_ssize_t nargs) {    \
        return t##P##_unlock(self, NULL);                                                         \
    }                                                                                             \
    static PyObject *t##P##_recover(TLockObject *self, PyObject *const *args, Py_ssize_t nargs) { \
        return tlock_recover(self, args, nargs, P##_recover);                                     \
    }                                                                                             \
    static PyMethodDef t##P##_methods[] = {                                                       \
        {"lock", (PyCFunction)(void (*)(void))t##P##_lock, METH_FASTCALL, "lock(timeout_ns=-1) -> bool (traced)"}, \
        {"trylock", (PyCFunction)t##P##_trylock, METH_NOARGS, "trylock() -> bool (traced)"},     \
        {"unlock", (PyCFunction)t##P##_unlock, METH_NOARGS, "unlock() (traced)"},                \
        {"recover", (PyCFunction)(void (*)(void))t##P##_recover, METH_FASTCALL, "recover(pid, start) -> bool (traced)"}, \
        EXTRA                                                                                     \
        {"__enter__", (PyCFunction)(void (*)(void))t##P##_lock, METH_FASTCALL, NULL},            \
        {"__exit__", (PyCFunction)(void (*)(void))t##P##_exit, METH_FASTCALL, NULL},             \
        {NULL}};                                                                                  \
    PyTypeObject t##P##_type = {                                                                  \
        PyVarObject_HEAD_INIT(NULL, 0).tp_name = "ipc._prims." NAME,                              \
        .tp_basicsize = sizeof(TLockObject), .tp_flags = Py_TPFLAGS_DEFAULT,                      \
        .tp_doc = NAME ": its waits and holds are events in this process' trace ring",           \
        .tp_init = (initproc)t##P##_init, .tp_methods = t##P##_methods, .tp_members = tlock_members};

TRACED_LOCK(spin, "TracedSpinLock", )
TRACED_LOCK(mutex, "TracedMutex", )

/* TracedRwLock's read side: the outermost read section is a hold (argument b = 1: read) and a
 * waiting read_lock a wait (b = 1), on the lock's name like its write holds */
static PyObject *trw_read_lock(TLockObject *self, PyObject *const *args, Py_ssize_t nargs) {
    int64_t id = self->trace_id;
    int saved = self->base.tr_waited;
    self->base.tr_waited = 0;
    PyObject *r = rw_read_lock((LockObject *)self, args, nargs);
    int waited = self->base.tr_waited;
    self->base.tr_waited = saved;
    int outer = self->base.rd_nest == 1;
    if (waited) tr_put(TR_CODE(TR_CAT_WAIT, TR_PH_E, id), r == Py_True, 1);
    if (r == Py_True && outer) tr_put(TR_CODE(TR_CAT_HOLD, TR_PH_B, id), waited, 1);
    return r;
}

static PyObject *trw_read_trylock(TLockObject *self, PyObject *u) {
    int outer = self->base.rd_nest == 0;
    PyObject *r = rw_read_trylock((LockObject *)self, NULL);
    if (r == Py_True && outer) tr_put(TR_CODE(TR_CAT_HOLD, TR_PH_B, self->trace_id), 0, 1);
    return r;
}

static PyObject *trw_read_unlock(TLockObject *self, PyObject *u) {
    if (self->base.mem && self->base.mem->has_view && self->base.rd_nest == 1)
        tr_put(TR_CODE(TR_CAT_HOLD, TR_PH_E, self->trace_id), 0, 1);
    return rw_read_unlock((LockObject *)self, NULL);
}

#define TRW_READ_METHODS                                                                          \
    {"read_lock", (PyCFunction)(void (*)(void))trw_read_lock, METH_FASTCALL, "read_lock(timeout_ns=-1) -> bool (traced)"}, \
    {"read_trylock", (PyCFunction)trw_read_trylock, METH_NOARGS, "read_trylock() -> bool (traced)"}, \
    {"read_unlock", (PyCFunction)trw_read_unlock, METH_NOARGS, "read_unlock() (traced)"},
TRACED_LOCK(rw, "TracedRwLock", TRW_READ_METHODS)

/* ---- traced RCU reader: the outermost read-side section is a slice */

static int treader_init(TReaderObject *self, PyObject *args, PyObject *kw) {
    if (reader_init((ReaderObject *)self, args, kw) < 0) return -1;
    self->trace_id = self->base.hdr - self->base.mem->base;
    return 0;
}

static PyObject *treader_lock(TReaderObject *self, PyObject *unused) {
    if (!MEM_LIVE(self->base.mem)) return NULL;
    PyObject *r = reader_lock((ReaderObject *)self, NULL);
    /* outermost iff nesting is 1 now (a hook may have entered this slot meanwhile) */
    if (r && (LDR(&self->base.slot[0]) & GP_CTR_NEST_MASK) == GP_COUNT) tr_put(TR_CODE(TR_CAT_RCU, TR_PH_B, self->trace_id), 0, 0);
    return r;
}

static PyObject *treader_unlock(TReaderObject *self, PyObject *unused) {
    if (!MEM_LIVE(self->base.mem)) return NULL;
    if ((LDR(&self->base.slot[0]) & GP_CTR_NEST_MASK) == GP_COUNT)
        tr_put(TR_CODE(TR_CAT_RCU, TR_PH_E, self->trace_id), 0, 0);
    return reader_unlock((ReaderObject *)self, NULL);
}

static PyObject *treader_exit(TReaderObject *self, PyObject *const *args, Py_ssize_t nargs) {
    return treader_unlock(self, NULL);
}

static PyMethodDef treader_methods[] = {
    {"lock", (PyCFunction)treader_lock, METH_NOARGS, "rcu_read_lock() (traced)"},
    {"unlock", (PyCFunction)treader_unlock, METH_NOARGS, "rcu_read_unlock() (traced)"},
    {"__enter__", (PyCFunction)treader_lock, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)(void (*)(void))treader_exit, METH_FASTCALL, NULL},
    {NULL}};

PyTypeObject TracedRcuReaderType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "ipc._prims.TracedRcuReader",
    .tp_basicsize = sizeof(TReaderObject), .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "RcuReader whose outermost read-side sections are events in this process' trace ring",
    .tp_init = (initproc)treader_init, .tp_methods = treader_methods, .tp_members = treader_members};
