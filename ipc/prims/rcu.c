/*
 * ipc/prims/rcu.c -- the RCU read side (RcuReader) and the grace period's wait for readers.
 *
 * liburcu's "mb" flavour on the domain header and one reader slot per process (layouts in
 * prims.h): rcu_read_lock stores a snapshot of gp_ctr (phase | GP_COUNT) into the slot, then a
 * full barrier (smp_mb); nested locks only count up.  The outermost rcu_read_unlock is a full
 * barrier, the decrement, a full barrier, then a wake of a writer sleeping on gp_futex.  The
 * writer side (ipc/rcu.py) flips the phase and calls rcu_wait_readers, which scans the slots for
 * readers still inside a section of the old phase (its barriers are argued there).
 */
#include "prims.h"

int reader_init(ReaderObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"mem", "header_index", "slot_index", NULL};
    PyObject *mem;
    Py_ssize_t hi, si;
    if (self->mem) return refuse_reinit("RcuReader");
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!nn", kwlist, &MemType, &mem, &hi, &si)) return -1;
    MemObject *m = (MemObject *)mem;
    int64_t *h = mem_word_at(m, hi, 8, "RcuReader header");
    int64_t *s = h ? mem_word_at(m, si, 8, "RcuReader slot") : NULL;
    if (!s) return -1;
    if (self->mem) return refuse_reinit("RcuReader");  /* initialised by __index__ meanwhile */
    Py_INCREF(mem);
    Py_XSETREF(self->mem, m);
    self->hdr = h;
    self->slot = s;
    return 0;
}

static void reader_dealloc(ReaderObject *self) {
    Py_XDECREF(self->mem);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

PyObject *reader_lock(ReaderObject *self, PyObject *unused) {
    if (!MEM_LIVE(self->mem)) return NULL;
    VT_MEM(self->mem, VP_RCU_READ, self->slot, 1);
    int64_t *ctr = &self->slot[0];
    int64_t tmp = LDR(ctr);
    if (!(tmp & GP_CTR_NEST_MASK)) {
        int64_t snap = LDR(&self->hdr[0]);
        if (__builtin_expect(pp_hook != NULL, 0)) {
            /* POINT rcu.read_lock.after_ctr_load: the gp counter (phase | GP_COUNT) is loaded, the
             * slot not yet stored.  A grace period that flips and scans now does not see this
             * reader, which then publishes the old phase: the two-wait grace period is built for
             * exactly this (its wait before the flip), a one-wait one misses the reader.
             * Consistency: nothing was stored yet, so an exception returns with the slot as it
             * was (nesting 0, not published).  If the slot is inside a section when the hook
             * returns (the hook, or a thread while it had dropped the GIL, took this slot's
             * read lock), this call nests in that section instead of overwriting it. */
            if (PREEMPT_POINT(self->mem, PP_RCU_READ_LOCK_AFTER_CTR_LOAD, NULL) != PP_OK) return NULL;
            tmp = LDR(ctr);
            if (__builtin_expect(tmp & GP_CTR_NEST_MASK, 0)) {
                STR(ctr, tmp + GP_COUNT);
                Py_RETURN_NONE;
            }
        }
        STR(ctr, snap);
        MB();
    } else {
        STR(ctr, tmp + GP_COUNT);
    }
    Py_RETURN_NONE;
}

PyObject *reader_unlock(ReaderObject *self, PyObject *unused) {
    if (!MEM_LIVE(self->mem)) return NULL;
    VT_MEM(self->mem, VP_RCU_READ, self->slot, 1);
    int64_t *ctr = &self->slot[0];
    int64_t tmp = LDR(ctr);
    int64_t nest = tmp & GP_CTR_NEST_MASK;
    if (nest == 0) {
        PyErr_SetString(PyExc_RuntimeError, "rcu_read_unlock without rcu_read_lock");
        return NULL;
    }
    if (nest == GP_COUNT) {
        MB();
        STR(ctr, tmp - GP_COUNT);
        MB();
        int32_t *gpf = (int32_t *)&self->hdr[2];
        if (LDR(gpf) == -1) {
            __atomic_store_n(gpf, 0, __ATOMIC_RELAXED);
            futex_wake32(gpf, INT_MAX);
        }
    } else {
        STR(ctr, tmp - GP_COUNT);
    }
    Py_RETURN_NONE;
}

static PyObject *reader_nesting(ReaderObject *self, PyObject *unused) {
    if (!MEM_LIVE(self->mem)) return NULL;
    return PyLong_FromLongLong(LDR(&self->slot[0]) & GP_CTR_NEST_MASK);
}

static PyObject *reader_exit(ReaderObject *self, PyObject *const *args, Py_ssize_t nargs) {
    return reader_unlock(self, NULL);
}

static PyMethodDef reader_methods[] = {
    {"lock", (PyCFunction)reader_lock, METH_NOARGS, "rcu_read_lock()"},
    {"unlock", (PyCFunction)reader_unlock, METH_NOARGS, "rcu_read_unlock()"},
    {"nesting", (PyCFunction)reader_nesting, METH_NOARGS, "current nesting depth"},
    {"__enter__", (PyCFunction)reader_lock, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)(void (*)(void))reader_exit, METH_FASTCALL, NULL},
    {NULL}
};

PyTypeObject ReaderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ipc._prims.RcuReader",
    .tp_basicsize = sizeof(ReaderObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "RcuReader(mem, header_index, slot_index): liburcu-mb style read side",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)reader_init,
    .tp_dealloc = (destructor)reader_dealloc,
    .tp_methods = reader_methods,
};

/* A reader slot blocks the grace period when it is inside a critical section
 * that began in the phase opposite to gp_ctr's current phase. */
static inline int slot_blocks(int64_t *slot, int64_t gp) {
    int64_t v = LD(&slot[0]);
    return (v & GP_CTR_NEST_MASK) && ((v ^ gp) & GP_CTR_PHASE);
}

/* rcu_wait_readers(mem, header_index, slot0_index, nslots, timeout_ns) -> -1 when no slot
 * of the old phase remains, else the index of a slot still blocking after timeout_ns.
 * Spins ~100 polls, then sleeps on the header's gp_futex (readers wake it). GIL released
 * while sleeping. */
PyObject *rcu_wait_readers(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    CHECK_NARGS(5, "rcu_wait_readers");
    if (!PyObject_TypeCheck(args[0], &MemType)) { PyErr_SetString(PyExc_TypeError, "need Mem"); return NULL; }
    MemObject *m = (MemObject *)args[0];
    int64_t hi, s0, ns, to;
    if (get_i64(args[1], &hi) < 0 || get_i64(args[2], &s0) < 0 || get_i64(args[3], &ns) < 0 ||
        get_i64(args[4], &to) < 0)
        return NULL;
    if (ns < 0) { PyErr_SetString(PyExc_ValueError, "rcu_wait_readers: nslots < 0"); return NULL; }
    Py_ssize_t span = words_span(ns, 8, "rcu slots");  /* ns * 8 must not wrap */
    if (span < 0) return NULL;
    int64_t *hdr = mem_word_at(m, hi, 8, "rcu header");
    int64_t *slots = hdr ? mem_word_at(m, s0, span, "rcu slots") : NULL;
    if (!slots) return NULL;
    int32_t *gpf = (int32_t *)&hdr[2];
    VT(VP_GP_SCAN);
    int64_t start = now_ns();
    int64_t blocker = -1;
    int attempts = 0;
    /* Order the caller's earlier stores (the unpublished pointer, the phase flip, gp_state) before
     * the reads of the reader slots: a reader that entered after this scan must see them
     * (liburcu's smp_mb_master()).  An acquiring CAS is not a full barrier on aarch64. */
    MB();
    for (;;) {
        int64_t gp = LD(&hdr[0]);
        blocker = -1;
        for (int64_t i = 0; i < ns; i++)
            if (slot_blocks(&slots[i * 8], gp)) { blocker = i; break; }
        if (blocker < 0) break;
        if (vt_clk || (to >= 0 && now_ns() - start >= to)) break;  /* virtual time: one scan, the turnstile waits */
        if (++attempts < 100) { cpu_relax(); continue; }
        /* sleep: announce, recheck, wait (bounded so a missed wake costs at most 1 ms) */
        __atomic_store_n(gpf, -1, __ATOMIC_RELAXED);
        MB();
        if (!slot_blocks(&slots[blocker * 8], gp)) { __atomic_store_n(gpf, 0, __ATOMIC_RELAXED); continue; }
        mem_block_begin(m);
        Py_BEGIN_ALLOW_THREADS
        futex_wait32(gpf, -1, 1000000LL);
        Py_END_ALLOW_THREADS
        if (mem_released_meanwhile(m)) { mem_block_end(m); return NULL; }
        mem_block_end(m);
        __atomic_store_n(gpf, 0, __ATOMIC_RELAXED);
        if (PyErr_CheckSignals() < 0) return NULL;
    }
    MB();
    return PyLong_FromLongLong(blocker);
}
