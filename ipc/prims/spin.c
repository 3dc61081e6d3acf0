/*
 * ipc/prims/spin.c -- SpinLock: test-and-test-and-set with pause on the lock block's state word.
 *
 * The state word is the holder: pid << 32 | owner tag, taken by one acquiring CAS (0 -> that
 * value) and released by a release store of 0 (holder identity: holder.c).  The acquire CAS and
 * the release store are the only ordering the lock gives; its statistics are the holder's own
 * relaxed stores.  A waiter polls with relaxed loads (cpu_relax), yields the CPU (GIL released)
 * every `spins` polls, runs signal handlers, and checks its holder every HOLDER_CHECK_NS.
 */
#include "prims.h"

int spin_init(LockObject *self, PyObject *args, PyObject *kw) {
    return lock_common_init(self, args, kw, "SpinLock", 0, 0);
}

/* lock(timeout_ns=-1) -> True, or False on timeout.  Test-and-test-and-set with pause,
 * sched_yield after `spins` polls; Python signal handlers run while waiting; raises LockHolderDied
 * if the holder is found dead (checked every HOLDER_CHECK_NS of waiting). */
PyObject *spin_lock(LockObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!MEM_LIVE(self->mem)) return NULL;
    VT_LOCK(self, VP_LOCK);
    int64_t *state = &self->lk[LK_STATE];
    int64_t expected = 0;
    if (self->busted) Py_RETURN_TRUE;
    int64_t me = g_pid_hi | self->tag, start = my_start();
    if (__builtin_expect(__atomic_compare_exchange_n(state, &expected, me, 0, __ATOMIC_ACQUIRE,
                                                     __ATOMIC_RELAXED), 1)) {
        STR(&self->lk[LK_START], start);
        if (self->st) stat_acquired(self, cyc());
        Py_RETURN_TRUE;
    }
    if (expected == me) {
        PyErr_SetString(PyExc_RuntimeError, "SpinLock: recursive lock (deadlock) by its holder");
        return NULL;
    }
    VT_NO_WAIT("SpinLock.lock")
    int64_t deadline;
    if (parse_timeout(args, nargs, &deadline) < 0) return NULL;
    /* POINT spin.slow.after_trylock: the first CAS failed (held by another), the spinning has not
     * begun.  Consistency: this call wrote nothing (no state, start, stats or trace event yet):
     * an exception returns with the lock untouched by it. */
    if (PREEMPT_POINT(self->mem, PP_SPIN_SLOW_AFTER_TRYLOCK, NULL) != PP_OK) return NULL;
    if (__builtin_expect(LDR(state) == me, 0)) {
        PyErr_SetString(PyExc_RuntimeError, "SpinLock: recursive lock (deadlock) by its holder");
        return NULL;
    }
    int64_t t0 = cyc();
    if (self->traced) tr_wait_begin(self, t0);
    int64_t next_check = now_ns() + HOLDER_CHECK_NS;
    int64_t n = 0;
    for (;;) {
        while (LDR(state) != 0) {
            cpu_relax();
            if (++n >= self->spins) {
                n = 0;
                mem_block_begin(self->mem);
                Py_BEGIN_ALLOW_THREADS
                sched_yield();
                Py_END_ALLOW_THREADS
                if (mem_released_meanwhile(self->mem)) { mem_block_end(self->mem); return NULL; }
                mem_block_end(self->mem);
                if (PyErr_CheckSignals() < 0) return NULL;
                int64_t t = now_ns();
                if (deadline >= 0 && t >= deadline) Py_RETURN_FALSE;
                if (t >= next_check) {
                    if (check_holder(self) < 0) return NULL;
                    next_check = now_ns() + HOLDER_CHECK_NS;
                }
            }
        }
        expected = 0;
        if (__atomic_compare_exchange_n(state, &expected, me, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
            break;
    }
    STR(&self->lk[LK_START], start);
    if (self->st) {
        int64_t t1 = cyc();
        stat_acquired(self, t1);
        stat_wait(self->st, cyc_ns(t1 - t0));
    }
    Py_RETURN_TRUE;
}

PyObject *spin_trylock(LockObject *self, PyObject *unused) {
    if (!MEM_LIVE(self->mem)) return NULL;
    VT_LOCK(self, VP_LOCK);
    int64_t expected = 0;
    if (self->busted) Py_RETURN_TRUE;
    int64_t start = my_start();
    if (__atomic_compare_exchange_n(&self->lk[LK_STATE], &expected, g_pid_hi | self->tag, 0, __ATOMIC_ACQUIRE,
                                    __ATOMIC_RELAXED)) {
        STR(&self->lk[LK_START], start);
        if (self->st) stat_acquired(self, cyc());
        Py_RETURN_TRUE;
    }
    Py_RETURN_FALSE;
}

PyObject *spin_unlock(LockObject *self, PyObject *unused) {
    if (!MEM_LIVE(self->mem)) return NULL;
    VT_LOCK(self, VP_UNLOCK);
    int64_t *state = &self->lk[LK_STATE];
    if (self->busted) Py_RETURN_NONE;
    int64_t v = LDR(state);
    if (__builtin_expect(v != (g_pid_hi | self->tag), 0)) return not_holder_error(self, v, LO32(v));
    if (self->st) stat_released(self);
    STR(&self->lk[LK_START], 0);
    ST(state, 0);
    Py_RETURN_NONE;
}

/* held by this object's tag in this process? */
PyObject *spin_is_held(LockObject *self, PyObject *unused) {
    if (!MEM_LIVE(self->mem)) return NULL;
    return PyBool_FromLong(self->busted || LDR(&self->lk[LK_STATE]) == (g_pid_hi | self->tag));
}

static PyObject *spin_exit(LockObject *self, PyObject *const *args, Py_ssize_t nargs) {
    return spin_unlock(self, NULL);
}

static PyMethodDef spin_methods[] = {
    {"lock", (PyCFunction)(void (*)(void))spin_lock, METH_FASTCALL,
     "lock(timeout_ns=-1) -> bool; raises LockHolderDied if the holder died"},
    {"trylock", (PyCFunction)spin_trylock, METH_NOARGS, "trylock() -> bool"},
    {"unlock", (PyCFunction)spin_unlock, METH_NOARGS, "unlock(); raises if not held by this tag in this process"},
    {"is_held", (PyCFunction)spin_is_held, METH_NOARGS, "held by this tag in this process?"},
    {"owner", (PyCFunction)lock_owner, METH_NOARGS, "current owner tag (0 = free)"},
    {"holder", (PyCFunction)lock_holder, METH_NOARGS, "(pid, start time) of the holder, (0, 0) when free"},
    {"recover", (PyCFunction)(void (*)(void))lock_recover, METH_FASTCALL,
     "recover(holder_pid, holder_start) -> bool: take the lock over from that dead holder"},
    {"__enter__", (PyCFunction)(void (*)(void))spin_lock, METH_FASTCALL, NULL},
    {"__exit__", (PyCFunction)(void (*)(void))spin_exit, METH_FASTCALL, NULL},
    {NULL}
};

PyTypeObject SpinLockType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ipc._prims.SpinLock",
    .tp_basicsize = sizeof(LockObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "SpinLock(mem, lock_index, stats_index=-1, tag=1, spins=1000, busted=False, name=None)",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)spin_init,
    .tp_dealloc = (destructor)lock_dealloc,
    .tp_methods = spin_methods,
};
