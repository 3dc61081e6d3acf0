/*
 * ipc/prims/mutex.c -- Mutex: a futex mutex (Drepper's "mutex3") on the lock block's state word.
 *
 * The futex word is the low half of the state word; the high half is the holder's pid.  Every
 * transition is a 64-bit atomic on the whole word (the kernel's FUTEX_WAIT compares the low
 * half): 0 -> pid|1 (uncontended), x -> pid|2 (taken contended), pid|1 -> pid|2 (a waiter marks it
 * contended, the pid stays), unlock: xchg(0), wake one if it was 2.
 */
#include "prims.h"

int mutex_init(LockObject *self, PyObject *args, PyObject *kw) {
    return lock_common_init(self, args, kw, "Mutex", 1, 0);
}

/* take the mutex if free (as contended: pid|2) or mark it contended; returns the old futex value
 * (0 = we took it) */
static inline int32_t mutex_take_or_mark(int64_t *w, int64_t me) {
    int64_t v = LDR(w);
    for (;;) {
        uint32_t lo = LO32(v);
        if (lo == 2) return 2;
        int64_t nv = lo == 0 ? (me | 2) : ((v & ~(int64_t)UINT32_MAX) | 2);
        if (__atomic_compare_exchange_n(w, &v, nv, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)) return (int32_t)lo;
    }
}

#define MUTEX_SLEEP_NS (50 * 1000000LL) /* bound on one futex sleep (signals, timeouts) */

PyObject *mutex_lock(LockObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!MEM_LIVE(self->mem)) return NULL;
    VT_LOCK(self, VP_LOCK);
    int64_t *w = &self->lk[LK_STATE];
    int32_t *f = (int32_t *)w;
    if (self->busted) Py_RETURN_TRUE;
    int64_t me = g_pid_hi, start = my_start();
    int64_t c = 0;
    int64_t t0 = 0;
    if (!__atomic_compare_exchange_n(w, &c, me | 1, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)) {
        if (HI32(c) == HI32(me) && LDR(&self->lk[LK_OWNER]) == self->tag) {
            PyErr_SetString(PyExc_RuntimeError, "Mutex: recursive lock (deadlock) by its holder");
            return NULL;
        }
        VT_NO_WAIT("Mutex.lock")
        int64_t deadline;
        if (parse_timeout(args, nargs, &deadline) < 0) return NULL;
        /* POINT mutex.slow.after_trylock: the uncontended CAS failed, before the adaptive spin.
         * Consistency: this call wrote nothing (the futex word is not marked by it, no stats or
         * trace event): an exception returns with the mutex untouched by it. */
        if (PREEMPT_POINT(self->mem, PP_MUTEX_SLOW_AFTER_TRYLOCK, NULL) != PP_OK) return NULL;
        t0 = cyc();
        if (self->traced) tr_wait_begin(self, t0);
        int64_t next_check = now_ns() + HOLDER_CHECK_NS;
        /* brief adaptive spin before sleeping */
        int got = 0;
        for (int i = 0; i < 100 && !got; i++) {
            cpu_relax();
            int64_t v = LDR(w);
            if (LO32(v) == 0)
                got = __atomic_compare_exchange_n(w, &v, me | 1, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED);
        }
        if (!got) {
            int32_t old = mutex_take_or_mark(w, me);
            while (old != 0) {
                int64_t sleep = MUTEX_SLEEP_NS, t = now_ns();
                if (t >= next_check) {
                    if (check_holder(self) < 0) {
                        futex_wake32(f, 1); /* as below: never swallow a wake-up */
                        return NULL;
                    }
                    next_check = now_ns() + HOLDER_CHECK_NS;
                }
                if (deadline >= 0) {
                    int64_t rem = deadline - t;
                    /* f is 2 and the lock is held by someone else: its unlock wakes a waiter,
                     * so leaving here loses no wake-up */
                    if (rem <= 0) Py_RETURN_FALSE;
                    if (rem < sleep) sleep = rem;
                }
                if (next_check - t < sleep) sleep = next_check - t > 0 ? next_check - t : 1;
                /* POINT mutex.slow.before_sleep: the futex word is marked contended (2) and held
                 * by another (mutex_take_or_mark), the futex wait not begun.  Consistency: the
                 * mark is what any waiter leaves (the holder's unlock wakes one, perhaps
                 * nobody); this waiter holds nothing, and since it may have consumed an unlock's
                 * wake-up on an earlier round it passes one on before it leaves, as the signal
                 * path below does (also when the region was released meanwhile). */
                int pe = PREEMPT_POINT(self->mem, PP_MUTEX_SLOW_BEFORE_SLEEP, f);
                if (pe != PP_OK) {
                    if (pe == PP_ERROR) futex_wake32(f, 1);
                    return NULL;
                }
                mem_block_begin(self->mem);
                Py_BEGIN_ALLOW_THREADS
                futex_wait32(f, 2, sleep);
                Py_END_ALLOW_THREADS
                if (mem_released_meanwhile(self->mem)) {
                    futex_wake32(f, 1); /* as below: do not swallow a wake-up */
                    mem_block_end(self->mem);
                    return NULL;
                }
                mem_block_end(self->mem);
                if (PyErr_CheckSignals() < 0) {
                    /* We may have consumed the wake-up of an unlock (futex_wait returned 0 and
                     * the signal is raised afterwards): pass it on, or another sleeper would
                     * wait for its timeout although the lock is free. */
                    futex_wake32(f, 1);
                    return NULL;
                }
                old = mutex_take_or_mark(w, me);
            }
        }
    }
    STR(&self->lk[LK_START], start);
    STR(&self->lk[LK_OWNER], self->tag);
    if (self->st) {
        int64_t t1 = cyc();
        stat_acquired(self, t1);
        if (t0) stat_wait(self->st, cyc_ns(t1 - t0));
    }
    Py_RETURN_TRUE;
}

PyObject *mutex_trylock(LockObject *self, PyObject *unused) {
    if (!MEM_LIVE(self->mem)) return NULL;
    VT_LOCK(self, VP_LOCK);
    if (self->busted) Py_RETURN_TRUE;
    int64_t c = 0, start = my_start();
    if (!__atomic_compare_exchange_n(&self->lk[LK_STATE], &c, g_pid_hi | 1, 0, __ATOMIC_ACQUIRE,
                                     __ATOMIC_RELAXED))
        Py_RETURN_FALSE;
    STR(&self->lk[LK_START], start);
    STR(&self->lk[LK_OWNER], self->tag);
    if (self->st) stat_acquired(self, cyc());
    Py_RETURN_TRUE;
}

PyObject *mutex_unlock(LockObject *self, PyObject *unused) {
    if (!MEM_LIVE(self->mem)) return NULL;
    VT_LOCK(self, VP_LOCK);  /* an xchg, as the kernel's mutex_unlock fast path (a cmpxchg) */
    int64_t *w = &self->lk[LK_STATE];
    if (self->busted) Py_RETURN_NONE;
    int64_t v = LDR(w), owner = LDR(&self->lk[LK_OWNER]);
    if (__builtin_expect(LO32(v) == 0 || owner != self->tag || HI32(v) != HI32(g_pid_hi), 0))
        return not_holder_error(self, v, LO32(v) ? owner : 0);
    if (self->st) stat_released(self);
    STR(&self->lk[LK_OWNER], 0);
    STR(&self->lk[LK_START], 0);
    if (LO32(__atomic_exchange_n(w, 0, __ATOMIC_RELEASE)) == 2) futex_wake32((int32_t *)w, 1);
    Py_RETURN_NONE;
}

/* held by this object's tag in this process? */
PyObject *mutex_is_held(LockObject *self, PyObject *unused) {
    if (!MEM_LIVE(self->mem)) return NULL;
    int64_t v = LDR(&self->lk[LK_STATE]);
    return PyBool_FromLong(self->busted || (LO32(v) != 0 && HI32(v) == HI32(g_pid_hi) &&
                                            LDR(&self->lk[LK_OWNER]) == self->tag));
}

static PyObject *mutex_owner(LockObject *self, PyObject *unused) {
    if (!MEM_LIVE(self->mem)) return NULL;
    return PyLong_FromLongLong(LD(&self->lk[LK_OWNER]));
}

static PyObject *mutex_exit(LockObject *self, PyObject *const *args, Py_ssize_t nargs) {
    return mutex_unlock(self, NULL);
}

static PyMethodDef mutex_methods[] = {
    {"lock", (PyCFunction)(void (*)(void))mutex_lock, METH_FASTCALL,
     "lock(timeout_ns=-1) -> bool (sleeps on a futex); raises LockHolderDied if the holder died"},
    {"trylock", (PyCFunction)mutex_trylock, METH_NOARGS, "trylock() -> bool"},
    {"unlock", (PyCFunction)mutex_unlock, METH_NOARGS, "unlock(); raises if not held by this tag in this process"},
    {"is_held", (PyCFunction)mutex_is_held, METH_NOARGS, "held by this tag in this process?"},
    {"owner", (PyCFunction)mutex_owner, METH_NOARGS, "current owner tag (0 = free)"},
    {"holder", (PyCFunction)lock_holder, METH_NOARGS, "(pid, start time) of the holder, (0, 0) when free"},
    {"recover", (PyCFunction)(void (*)(void))lock_recover, METH_FASTCALL,
     "recover(holder_pid, holder_start) -> bool: take the lock over from that dead holder"},
    {"__enter__", (PyCFunction)(void (*)(void))mutex_lock, METH_FASTCALL, NULL},
    {"__exit__", (PyCFunction)(void (*)(void))mutex_exit, METH_FASTCALL, NULL},
    {NULL}
};

PyTypeObject MutexType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ipc._prims.Mutex",
    .tp_basicsize = sizeof(LockObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Mutex(mem, lock_index, stats_index=-1, tag=1, spins=..., busted=False, name=None): futex mutex",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)mutex_init,
    .tp_dealloc = (destructor)lock_dealloc,
    .tp_methods = mutex_methods,
};
