/*
 * ipc/prims/mem.c -- shared-memory access and atomics: the Mem type.
 *
 * A Mem is bound for life to one writable, 8-byte aligned buffer (the mmap of a /dev/shm segment)
 * and gives 64-bit word access to it by index: acquire loads, release stores, seq_cst RMWs
 * (fetch_add, xchg, cmpxchg), byte writes, and futex wait / wake on the low half of a word.  The
 * lock, reader, histogram, trace and virtual-time objects keep raw pointers into a Mem's buffer
 * and a reference to the Mem; mem_word_at() hands those pointers out (bounds-checked once), and
 * the busy count (mem_block_begin / _end in prims.h) keeps the mapping alive across every call that
 * waits with the GIL released.  Also here: the module's barrier and no-op floor (smp_mb, nop).
 */
#include "prims.h"

static int mem_init(MemObject *self, PyObject *args, PyObject *kw) {
    PyObject *obj;
    if (!PyArg_ParseTuple(args, "O:Mem", &obj)) return -1;
    if (self->inited) {
        /* lock / reader / histogram objects keep raw pointers into the first buffer */
        PyErr_SetString(PyExc_TypeError, "Mem: already initialised");
        return -1;
    }
    if (PyObject_GetBuffer(obj, &self->view, PyBUF_WRITABLE | PyBUF_SIMPLE) < 0) return -1;
    if (((uintptr_t)self->view.buf & 7) != 0) {
        PyBuffer_Release(&self->view);
        PyErr_SetString(PyExc_ValueError, "Mem: buffer is not 8-byte aligned");
        return -1;
    }
    self->has_view = 1;
    self->holds_view = 1;
    self->inited = 1;
    self->base = (int64_t *)self->view.buf;
    self->nwords = self->view.len / 8;
    return 0;
}

static void mem_dealloc(MemObject *self) {
    if (self->holds_view) PyBuffer_Release(&self->view);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static inline int64_t *mem_word(MemObject *m, PyObject *idx_obj) {
    Py_ssize_t i = PyLong_AsSsize_t(idx_obj);
    if (i == -1 && PyErr_Occurred()) return NULL;
    if (!m->has_view) { PyErr_SetString(PyExc_ValueError, "Mem: released"); return NULL; }
    if (i < 0 || i >= m->nwords) {
        PyErr_Format(PyExc_IndexError, "word index %zd out of range [0, %zd)", i, m->nwords);
        return NULL;
    }
    return &m->base[i];
}

/* words [i, i + span) of the buffer, for objects that keep the pointer (construction / attach time,
 * not a hot path).  Overflow-safe: i + span is never computed (a huge i or span from a caller must
 * raise, not wrap around to a pointer outside the buffer). */
int64_t *mem_word_at(MemObject *m, Py_ssize_t i, Py_ssize_t span, const char *what) {
    if (!m->has_view) { PyErr_SetString(PyExc_ValueError, "Mem: released"); return NULL; }
    if (i < 0 || span < 0 || span > m->nwords || i > m->nwords - span) {
        PyErr_Format(PyExc_IndexError, "%s: %zd words at word %zd outside buffer of %zd words",
                     what, span, i, m->nwords);
        return NULL;
    }
    return &m->base[i];
}

/* n * per words as a span for mem_word_at; -1 with IndexError set if it does not fit */
Py_ssize_t words_span(int64_t n, int64_t per, const char *what) {
    int64_t span;
    if (n < 0 || per < 0 || __builtin_mul_overflow(n, per, &span) || span > PY_SSIZE_T_MAX) {
        PyErr_Format(PyExc_IndexError, "%s: %lld x %lld words do not fit any buffer", what, (long long)n,
                     (long long)per);
        return -1;
    }
    return (Py_ssize_t)span;
}

static PyObject *mem_load(MemObject *self, PyObject *idx) {
    int64_t *w = mem_word(self, idx);
    if (!w) return NULL;
    VT_MEM(self, VP_LOAD, w, 0);
    return PyLong_FromLongLong(LD(w));
}

static PyObject *mem_store(MemObject *self, PyObject *const *args, Py_ssize_t nargs) {
    CHECK_NARGS(2, "store");
    int64_t *w = mem_word(self, args[0]);
    int64_t v;
    if (!w || get_i64(args[1], &v) < 0) return NULL;
    VT_MEM(self, VP_STORE, w, 1);
    ST(w, v);
    Py_RETURN_NONE;
}

static PyObject *mem_fetch_add(MemObject *self, PyObject *const *args, Py_ssize_t nargs) {
    CHECK_NARGS(2, "fetch_add");
    int64_t *w = mem_word(self, args[0]);
    int64_t v;
    if (!w || get_i64(args[1], &v) < 0) return NULL;
    VT_MEM(self, VP_RMW, w, 1);
    return PyLong_FromLongLong(__atomic_fetch_add(w, v, __ATOMIC_SEQ_CST));
}

static PyObject *mem_xchg(MemObject *self, PyObject *const *args, Py_ssize_t nargs) {
    CHECK_NARGS(2, "xchg");
    int64_t *w = mem_word(self, args[0]);
    int64_t v;
    if (!w || get_i64(args[1], &v) < 0) return NULL;
    VT_MEM(self, VP_RMW, w, 1);
    return PyLong_FromLongLong(__atomic_exchange_n(w, v, __ATOMIC_SEQ_CST));
}

/* cmpxchg(i, old, new) -> value found (== old on success), like the kernel's cmpxchg */
static PyObject *mem_cmpxchg(MemObject *self, PyObject *const *args, Py_ssize_t nargs) {
    CHECK_NARGS(3, "cmpxchg");
    int64_t *w = mem_word(self, args[0]);
    int64_t old, nv;
    if (!w || get_i64(args[1], &old) < 0 || get_i64(args[2], &nv) < 0) return NULL;
    VT_MEM(self, VP_RMW, w, 1);
    __atomic_compare_exchange_n(w, &old, nv, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return PyLong_FromLongLong(old);
}

static PyObject *mem_nop(MemObject *self, PyObject *unused) { Py_RETURN_NONE; }

/* write(byte_offset, data): copy a bytes-like object into the buffer (guest-memory stores of the
 * emulator / shadow copies). An aligned 8-byte write is one atomic store (no tearing for readers);
 * anything else is a plain memcpy, like copy_to_user. */
static PyObject *mem_write(MemObject *self, PyObject *const *args, Py_ssize_t nargs) {
    CHECK_NARGS(2, "write");
    Py_ssize_t off = PyLong_AsSsize_t(args[0]);
    if (off == -1 && PyErr_Occurred()) return NULL;
    if (!self->has_view) { PyErr_SetString(PyExc_ValueError, "Mem: released"); return NULL; }
    const char *src;
    Py_ssize_t n;
    Py_buffer b;
    int release = 0;
    if (PyBytes_CheckExact(args[1])) {
        src = PyBytes_AS_STRING(args[1]);
        n = PyBytes_GET_SIZE(args[1]);
    } else {
        if (PyObject_GetBuffer(args[1], &b, PyBUF_SIMPLE) < 0) return NULL;
        src = b.buf;
        n = b.len;
        release = 1;
    }
    if (off < 0 || n < 0 || off > self->nwords * 8 - n) {
        if (release) PyBuffer_Release(&b);
        PyErr_Format(PyExc_IndexError, "write of %zd bytes at %zd outside buffer of %zd bytes", n, off,
                     self->nwords * 8);
        return NULL;
    }
    char *dst = (char *)self->base + off;
    if (__builtin_expect(vt_on, 0) && self->vkey >= 0 && n > 0) {  /* one store per line it covers */
        int64_t *w0 = self->base + off / 8, *w1 = self->base + (off + n - 1) / 8;
        vt_mem(self, VP_WRITE, w0, 1);
        for (int64_t *w = w0 + 8 - ((w0 - self->base) & 7); w <= w1; w += 8) {
            *vt_clk += vt_price[VP_STORE];
            if (self->vkey > 0) vt_line(self->vkey, (w - self->base) >> 3, 1);
        }
    }
    if (n == 8 && !(off & 7)) {
        int64_t v;
        memcpy(&v, src, 8);
        __atomic_store_n((int64_t *)dst, v, __ATOMIC_RELEASE);
    } else {
        memcpy(dst, src, (size_t)n);
    }
    if (release) PyBuffer_Release(&b);
    Py_RETURN_NONE;
}

/* futex_wait(i, expected, timeout_ns=-1) -> 0 woken/mismatch, 1 timed out.  GIL released. */
static PyObject *mem_futex_wait(MemObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 2 || nargs > 3) { PyErr_SetString(PyExc_TypeError, "futex_wait(i, expected, timeout_ns=-1)"); return NULL; }
    int64_t *w = mem_word(self, args[0]);
    int64_t exp, to = -1;
    if (!w || get_i64(args[1], &exp) < 0) return NULL;
    if (nargs == 3 && get_i64(args[2], &to) < 0) return NULL;
    VT_MEM(self, VP_FUTEX_WAIT, w, 0);
    long r;
    int err;
    mem_block_begin(self);
    Py_BEGIN_ALLOW_THREADS
    r = futex_wait32((int32_t *)w, (int32_t)exp, to);
    err = errno;
    Py_END_ALLOW_THREADS
    mem_block_end(self);
    if (r == -1 && err == ETIMEDOUT) return PyLong_FromLong(1);
    if (r == -1 && err == EINTR && PyErr_CheckSignals() < 0) return NULL;
    return PyLong_FromLong(0);
}

static PyObject *mem_futex_wake(MemObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 1 || nargs > 2) { PyErr_SetString(PyExc_TypeError, "futex_wake(i, n=INT_MAX)"); return NULL; }
    int64_t *w = mem_word(self, args[0]);
    int64_t n = INT_MAX;
    if (!w) return NULL;
    if (nargs == 2 && get_i64(args[1], &n) < 0) return NULL;
    if (n < 0) { PyErr_SetString(PyExc_ValueError, "futex_wake: n < 0"); return NULL; }
    if (n > INT_MAX) n = INT_MAX;  /* (int)n would truncate: 2**32 would wake nobody */
    VT_MEM(self, VP_FUTEX_WAKE, w, 0);
    return PyLong_FromLong(futex_wake32((int32_t *)w, (int)n));
}

static PyObject *mem_release(MemObject *self, PyObject *unused) {
    self->has_view = 0;
    if (self->holds_view && self->busy == 0) {
        self->holds_view = 0;
        PyBuffer_Release(&self->view);
    }
    self->base = NULL;
    self->nwords = 0;
    Py_RETURN_NONE;
}

static PyObject *mem_get_nwords(MemObject *self, void *c) { return PyLong_FromSsize_t(self->nwords); }
static PyObject *mem_get_vkey(MemObject *self, void *c) { return PyLong_FromLongLong(self->vkey); }
static int mem_set_vkey(MemObject *self, PyObject *v, void *c) {
    if (!v) { PyErr_SetString(PyExc_TypeError, "vkey cannot be deleted"); return -1; }
    int64_t k;
    if (get_i64(v, &k) < 0) return -1;
    if (k < -1) { PyErr_SetString(PyExc_ValueError, "vkey: -1 (exempt), 0 (priced) or a positive key"); return -1; }
    self->vkey = k;
    return 0;
}

static PyMethodDef mem_methods[] = {
    {"load", (PyCFunction)mem_load, METH_O, "load(i) -> int: acquire load of word i"},
    {"store", (PyCFunction)(void (*)(void))mem_store, METH_FASTCALL, "store(i, v): release store"},
    {"fetch_add", (PyCFunction)(void (*)(void))mem_fetch_add, METH_FASTCALL, "fetch_add(i, v) -> old"},
    {"xchg", (PyCFunction)(void (*)(void))mem_xchg, METH_FASTCALL, "xchg(i, v) -> old"},
    {"cmpxchg", (PyCFunction)(void (*)(void))mem_cmpxchg, METH_FASTCALL, "cmpxchg(i, old, new) -> found"},
    {"futex_wait", (PyCFunction)(void (*)(void))mem_futex_wait, METH_FASTCALL,
     "futex_wait(i, expected, timeout_ns=-1) -> 1 if timed out; waits on the low 32 bits of word i"},
    {"futex_wake", (PyCFunction)(void (*)(void))mem_futex_wake, METH_FASTCALL, "futex_wake(i, n=all) -> woken"},
    {"nop", (PyCFunction)mem_nop, METH_NOARGS, "no-op (benchmark floor)"},
    {"write", (PyCFunction)(void (*)(void))mem_write, METH_FASTCALL,
     "write(byte_offset, data): copy bytes in (aligned 8 bytes: one atomic store)"},
    {"release", (PyCFunction)mem_release, METH_NOARGS, "drop the buffer export"},
    {NULL}
};

static PyGetSetDef mem_getset[] = {
    {"nwords", (getter)mem_get_nwords, NULL, "number of 64-bit words", NULL},
    {"vkey", (getter)mem_get_vkey, (setter)mem_set_vkey,
     "virtual time: > 0 key of its cache lines (transfers priced), 0 priced only, -1 exempt", NULL},
    {NULL}
};

PyTypeObject MemType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ipc._prims.Mem",
    .tp_basicsize = sizeof(MemObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Mem(buffer): 64-bit atomic word access to a writable buffer",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)mem_init,
    .tp_dealloc = (destructor)mem_dealloc,
    .tp_methods = mem_methods,
    .tp_getset = mem_getset,
};

/* "already initialised": a second __init__ would swap the Mem and the words under a call of another
 * thread blocked in this object (GIL released, holding its old pointers and the old Mem's busy
 * count): a use after unmap.  Every type holding pointers into a Mem is bound once for life. */
int refuse_reinit(const char *name) {
    PyErr_Format(PyExc_RuntimeError, "%s: already initialised (its words are bound for life)", name);
    return -1;
}

/* ------------------------------------------------------------------ module functions */

PyObject *m_nop(PyObject *mod, PyObject *unused) { Py_RETURN_NONE; }
PyObject *m_smp_mb(PyObject *mod, PyObject *unused) { VT(VP_FENCE); MB(); Py_RETURN_NONE; }
