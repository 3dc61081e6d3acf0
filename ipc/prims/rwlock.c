/*
 * ipc/prims/rwlock.c -- RwLock: a reader-writer spinlock.
 *
 * The kernel's rwlock_t (x86-64 KVM's kvm->mmu_lock is one, with KVM_HAVE_MMU_RWLOCK).  Any number
 * of readers or one writer.  Only the LOCK_WORDS words of the lock block:
 *   [0] state     the writer, exactly as SpinLock keeps it: 0 = no writer, else pid << 32 | owner
 *                 tag (so owner(), holder(), recover() and the dead-holder check work unchanged)
 *   [1] acq_ns, [3] acq_cyc, [4] start   the writer's, as SpinLock
 *   [5] readers   number of readers inside (plus, for a moment, a reader that found a writer and
 *                 is backing off); readers are anonymous: no pid, no tag
 *   [2], [6], [7] reserved
 *
 * Writer-preferring, like qrwlock: a writer first claims the state word (test-and-test-and-set,
 * as SpinLock: no queue among writers) and only then waits for the readers inside to leave (the
 * "drain"); while the state word is non-zero new readers do not enter.  A reader increments
 * `readers`, then looks at `state`: non-zero = a writer holds or claimed it, so it decrements again
 * and spins until `state` is 0 (cpu_relax, sched_yield after `spins` polls, as SpinLock).  Both
 * sides use a seq_cst RMW followed by a seq_cst load (store-buffering pattern): at least one of a
 * racing reader and writer sees the other.  Readers can starve under a steady stream of writers.
 *
 * During the drain the writer is already recorded in the state word: is_held() is true and
 * owner()/holder() name it (no other process can take the lock meanwhile; its lock() call has not
 * returned).  A timeout, a signal or a LockHolderDied during the drain gives the claim back.
 *
 * Dead holders: every waiter (reader or writer) checks the writer field every HOLDER_CHECK_NS
 * and raises LockHolderDied if the recorded writer (holder or drain-phase claimant) is dead.
 * Readers are anonymous, so only the writer field is checked: a reader that dies inside its
 * section is not detected, and a writer waits for it until its timeout (during the drain the
 * writer field is the waiting writer's own record, so the check finds nothing there).
 *
 * Read holds are counted per object (rd_nest): read_lock() on an object that already holds the
 * lock for read only counts up (a recursive read: it never waits, so a waiting writer cannot
 * deadlock it); only the outermost read_lock / read_unlock touch the shared count.  lock() by an
 * object holding it for read (an upgrade) and read_lock() by the write holder raise (deadlock).
 *
 * lock_stat: read acquisitions go into the same stats block as write acquisitions (one class per
 * lock, as /proc/lock_stat without a separate read class): an outermost read_lock is an
 * acquisition (a contention with its wait if it had to wait), its read_unlock a hold measured from
 * this object's own acquisition time; nested read_locks are not acquisitions.
 */
#include "prims.h"

#define LK_READERS 5

int rw_init(LockObject *self, PyObject *args, PyObject *kw) {
    return lock_common_init(self, args, kw, "RwLock", 0, 1);
}

enum { RW_GO_ON = 0, RW_TIMEOUT = 1, RW_ERROR = -1, RW_MEM_GONE = -2 };

/* One poll of a waiting loop: cpu_relax; every `spins` polls a sched_yield (GIL released), then
 * signals, the deadline and (every HOLDER_CHECK_NS) the writer field's holder, as spin_lock does. */
static int rw_wait_step(LockObject *self, int64_t *n, int64_t deadline, int64_t *next_check) {
    cpu_relax();
    if (++*n < self->spins) return RW_GO_ON;
    *n = 0;
    mem_block_begin(self->mem);
    Py_BEGIN_ALLOW_THREADS
    sched_yield();
    Py_END_ALLOW_THREADS
    if (mem_released_meanwhile(self->mem)) { mem_block_end(self->mem); return RW_MEM_GONE; }
    mem_block_end(self->mem);
    if (PyErr_CheckSignals() < 0) return RW_ERROR;
    int64_t t = now_ns();
    if (deadline >= 0 && t >= deadline) return RW_TIMEOUT;
    if (t >= *next_check) {
        if (check_holder(self) < 0) return RW_ERROR;
        *next_check = now_ns() + HOLDER_CHECK_NS;
    }
    return RW_GO_ON;
}

/* a writer gives back the state word it claimed (drain not finished: no hold to account) */
static inline void rw_drop_claim(LockObject *self) {
    STR(&self->lk[LK_START], 0);
    ST(&self->lk[LK_STATE], 0);
}

/* wait until no reader is inside (the state word is ours); r = RW_* */
static int rw_drain(LockObject *self, int64_t deadline, int64_t *n, int64_t *next_check) {
    int r = RW_GO_ON;
    while (__atomic_load_n(&self->lk[LK_READERS], __ATOMIC_SEQ_CST) != 0)
        if ((r = rw_wait_step(self, n, deadline, next_check)) != RW_GO_ON) break;
    return r;
}

static PyObject *rw_upgrade_error(void) {
    PyErr_SetString(PyExc_RuntimeError, "RwLock: write lock by a read holder of this object (upgrade: deadlock)");
    return NULL;
}

/* lock(timeout_ns=-1) -> True, or False on timeout: the write lock. */
PyObject *rw_lock(LockObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!MEM_LIVE(self->mem)) return NULL;
    VT_LOCK(self, VP_LOCK);
    int64_t *state = &self->lk[LK_STATE];
    if (self->busted) Py_RETURN_TRUE;
    if (__builtin_expect(self->rd_nest > 0, 0)) return rw_upgrade_error();
    int64_t me = g_pid_hi | self->tag, start = my_start(), expected = 0;
    int claimed = 0;
    if (__builtin_expect(__atomic_compare_exchange_n(state, &expected, me, 0, __ATOMIC_SEQ_CST,
                                                     __ATOMIC_RELAXED), 1)) {
        STR(&self->lk[LK_START], start);
        if (__builtin_expect(__atomic_load_n(&self->lk[LK_READERS], __ATOMIC_SEQ_CST) == 0, 1)) {
            if (self->st) stat_acquired(self, cyc());
            Py_RETURN_TRUE;
        }
        claimed = 1;  /* readers inside: drain below */
    } else if (expected == me) {
        PyErr_SetString(PyExc_RuntimeError, "RwLock: recursive lock (deadlock) by its holder");
        return NULL;
    }
    if (vt_clk) {
        if (claimed) rw_drop_claim(self);
        VT_NO_WAIT("RwLock.lock")
    }
    int64_t deadline;
    if (parse_timeout(args, nargs, &deadline) < 0) {
        if (claimed) rw_drop_claim(self);
        return NULL;
    }
    /* POINT rw.write.slow.after_trylock: the claim CAS failed (another writer holds or claimed the
     * state word), before the spinning.  Consistency: this call wrote nothing: an exception
     * returns with the lock untouched by it.  (A claimed call goes on to after_claim below.) */
    if (!claimed && PREEMPT_POINT(self->mem, PP_RW_WRITE_SLOW_AFTER_TRYLOCK, NULL) != PP_OK) return NULL;
    if (!claimed && __builtin_expect(self->rd_nest > 0, 0)) return rw_upgrade_error();
    int64_t t0 = cyc();
    if (self->traced) tr_wait_begin(self, t0);
    int64_t next_check = now_ns() + HOLDER_CHECK_NS, n = 0;
    int r = RW_GO_ON;
    while (!claimed) {
        while (LDR(state) != 0)
            if ((r = rw_wait_step(self, &n, deadline, &next_check)) != RW_GO_ON)
                return r == RW_TIMEOUT ? Py_NewRef(Py_False) : NULL;
        expected = 0;
        if (__atomic_compare_exchange_n(state, &expected, me, 0, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) {
            STR(&self->lk[LK_START], start);
            claimed = 1;
        }
    }
    /* POINT rw.write.slow.after_claim: the state word is this writer's (new readers stay out),
     * the readers inside have not drained.  Consistency: an exception gives the claim back
     * (rw_drop_claim: start word, then the state word released) exactly as a timeout during the
     * drain does, unless the region was released meanwhile (nothing may be touched then, as
     * RW_MEM_GONE).  No stats were counted. */
    int pe = PREEMPT_POINT(self->mem, PP_RW_WRITE_SLOW_AFTER_CLAIM, NULL);
    if (pe != PP_OK) {
        if (pe == PP_ERROR) rw_drop_claim(self);
        return NULL;
    }
    r = rw_drain(self, deadline, &n, &next_check);
    if (r != RW_GO_ON) {
        if (r != RW_MEM_GONE) rw_drop_claim(self);
        return r == RW_TIMEOUT ? Py_NewRef(Py_False) : NULL;
    }
    if (self->st) {
        int64_t t1 = cyc();
        stat_acquired(self, t1);
        stat_wait(self->st, cyc_ns(t1 - t0));
    }
    Py_RETURN_TRUE;
}

PyObject *rw_trylock(LockObject *self, PyObject *unused) {
    if (!MEM_LIVE(self->mem)) return NULL;
    VT_LOCK(self, VP_LOCK);
    if (self->busted) Py_RETURN_TRUE;
    if (self->rd_nest > 0) Py_RETURN_FALSE;  /* its own read hold is inside */
    int64_t expected = 0, start = my_start();
    if (!__atomic_compare_exchange_n(&self->lk[LK_STATE], &expected, g_pid_hi | self->tag, 0, __ATOMIC_SEQ_CST,
                                     __ATOMIC_RELAXED))
        Py_RETURN_FALSE;
    STR(&self->lk[LK_START], start);
    if (__atomic_load_n(&self->lk[LK_READERS], __ATOMIC_SEQ_CST) != 0) {
        rw_drop_claim(self);
        Py_RETURN_FALSE;
    }
    if (self->st) stat_acquired(self, cyc());
    Py_RETURN_TRUE;
}

/* the write side's release and "held by this tag in this process?" are SpinLock's */
PyObject *rw_unlock(LockObject *self, PyObject *unused) { return spin_unlock(self, unused); }
PyObject *rw_is_held(LockObject *self, PyObject *unused) { return spin_is_held(self, unused); }

static PyObject *rw_exit(LockObject *self, PyObject *const *args, Py_ssize_t nargs) {
    return rw_unlock(self, NULL);
}

/* recover(holder_pid, holder_start): SpinLock's takeover of the writer field, then the drain (the
 * dead writer may have died before the readers left).  The drain has no timeout; a signal ends
 * it: the lock is released again and the exception raised. */
PyObject *rw_recover(LockObject *self, PyObject *const *args, Py_ssize_t nargs) {
    PyObject *r = lock_recover(self, args, nargs);
    if (r != Py_True) return r;
    int64_t n = 0, next_check = now_ns() + HOLDER_CHECK_NS;
    int d = rw_drain(self, -1, &n, &next_check);
    if (d == RW_GO_ON) return r;
    Py_DECREF(r);
    if (d != RW_MEM_GONE) {
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        PyObject *u = spin_unlock(self, NULL);
        Py_XDECREF(u);
        PyErr_Restore(et, ev, tb);
    }
    return NULL;
}

static inline void rw_read_acquired(LockObject *self) {
    self->rd_nest = 1;
    if (self->st) {
        self->rd_acq_cyc = cyc();
        stat_add(self->st, ST_ACQ, 1);
    }
}

/* one try: enter as a reader unless a writer holds or claimed the lock */
static inline int rw_read_enter(int64_t *lk) {
    __atomic_fetch_add(&lk[LK_READERS], 1, __ATOMIC_SEQ_CST);
    if (__builtin_expect(__atomic_load_n(&lk[LK_STATE], __ATOMIC_SEQ_CST) == 0, 1)) return 1;
    __atomic_fetch_sub(&lk[LK_READERS], 1, __ATOMIC_RELEASE);  /* back off: the writer goes first */
    return 0;
}

/* read_lock(timeout_ns=-1) -> True, or False on timeout. */
PyObject *rw_read_lock(LockObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!MEM_LIVE(self->mem)) return NULL;
    VT_LOCK(self, VP_LOCK);
    if (self->rd_nest > 0) { self->rd_nest++; Py_RETURN_TRUE; }  /* recursive read */
    if (self->busted) { self->rd_nest = 1; Py_RETURN_TRUE; }
    int64_t *state = &self->lk[LK_STATE];
    if (__builtin_expect(rw_read_enter(self->lk), 1)) {
        rw_read_acquired(self);
        Py_RETURN_TRUE;
    }
    if (LDR(state) == (g_pid_hi | self->tag)) {
        PyErr_SetString(PyExc_RuntimeError, "RwLock: read_lock by its write holder (deadlock)");
        return NULL;
    }
    VT_NO_WAIT("RwLock.read_lock")
    int64_t deadline;
    if (parse_timeout(args, nargs, &deadline) < 0) return NULL;
    int64_t t0 = cyc();
    if (self->traced) tr_wait_begin(self, t0);
    int64_t next_check = now_ns() + HOLDER_CHECK_NS, n = 0;
    for (;;) {
        /* POINT rw.read.slow.after_backoff: rw_read_enter found a writer and backed off (its
         * increment of `readers` undone), before the wait; again after each lost retry.
         * Consistency: `readers` is back to what it was without this reader, rd_nest is 0, no
         * stats are counted: an exception leaves the lock as if read_lock was never called
         * (but for a wait-begin trace event, which the traced wrapper closes as not acquired). */
        if (PREEMPT_POINT(self->mem, PP_RW_READ_SLOW_AFTER_BACKOFF, NULL) != PP_OK) return NULL;
        if (__builtin_expect(self->rd_nest > 0, 0)) { self->rd_nest++; Py_RETURN_TRUE; }  /* the hook took it */
        if (__builtin_expect(LDR(state) == (g_pid_hi | self->tag), 0)) {
            PyErr_SetString(PyExc_RuntimeError, "RwLock: read_lock by its write holder (deadlock)");
            return NULL;
        }
        while (LDR(state) != 0) {
            int r = rw_wait_step(self, &n, deadline, &next_check);
            if (r == RW_TIMEOUT) Py_RETURN_FALSE;
            if (r != RW_GO_ON) return NULL;
        }
        if (rw_read_enter(self->lk)) break;
    }
    rw_read_acquired(self);
    if (self->st) stat_wait(self->st, cyc_ns(self->rd_acq_cyc - t0));
    Py_RETURN_TRUE;
}

PyObject *rw_read_trylock(LockObject *self, PyObject *unused) {
    if (!MEM_LIVE(self->mem)) return NULL;
    VT_LOCK(self, VP_LOCK);
    if (self->rd_nest > 0) { self->rd_nest++; Py_RETURN_TRUE; }
    if (self->busted) { self->rd_nest = 1; Py_RETURN_TRUE; }
    if (!rw_read_enter(self->lk)) Py_RETURN_FALSE;
    rw_read_acquired(self);
    Py_RETURN_TRUE;
}

PyObject *rw_read_unlock(LockObject *self, PyObject *unused) {
    if (!MEM_LIVE(self->mem)) return NULL;
    VT_LOCK(self, VP_LOCK);  /* an atomic decrement */
    if (self->rd_nest <= 0) {
        if (self->busted) Py_RETURN_NONE;
        PyErr_Format(PyExc_RuntimeError, "RwLock: read_unlock by tag %lld (pid %lld) without read_lock",
                     (long long)self->tag, (long long)HI32(g_pid_hi));
        return NULL;
    }
    if (--self->rd_nest > 0 || self->busted) Py_RETURN_NONE;
    if (self->st) stat_hold(self->st, cyc_ns(cyc() - self->rd_acq_cyc));
    __atomic_fetch_sub(&self->lk[LK_READERS], 1, __ATOMIC_RELEASE);
    Py_RETURN_NONE;
}

/* held for read by this object? */
static PyObject *rw_read_held(LockObject *self, PyObject *unused) {
    if (!MEM_LIVE(self->mem)) return NULL;
    return PyBool_FromLong(self->busted || self->rd_nest > 0);
}

/* readers() -> the shared reader count (may include, for a moment, a reader backing off) */
static PyObject *rw_readers(LockObject *self, PyObject *unused) {
    if (!MEM_LIVE(self->mem)) return NULL;
    return PyLong_FromLongLong(LD(&self->lk[LK_READERS]));
}

static PyMethodDef rw_methods[] = {
    {"lock", (PyCFunction)(void (*)(void))rw_lock, METH_FASTCALL,
     "lock(timeout_ns=-1) -> bool: write lock; raises LockHolderDied if the writer holding it died"},
    {"trylock", (PyCFunction)rw_trylock, METH_NOARGS, "trylock() -> bool: write lock if free of writer and readers"},
    {"unlock", (PyCFunction)rw_unlock, METH_NOARGS, "unlock(): write unlock; raises if not held by this tag in this process"},
    {"is_held", (PyCFunction)rw_is_held, METH_NOARGS, "held for write by this tag in this process?"},
    {"owner", (PyCFunction)lock_owner, METH_NOARGS, "owner tag of the writer (0 = no writer)"},
    {"holder", (PyCFunction)lock_holder, METH_NOARGS, "(pid, start time) of the writer, (0, 0) when none"},
    {"recover", (PyCFunction)(void (*)(void))rw_recover, METH_FASTCALL,
     "recover(holder_pid, holder_start) -> bool: take the write lock over from that dead writer"},
    {"read_lock", (PyCFunction)(void (*)(void))rw_read_lock, METH_FASTCALL,
     "read_lock(timeout_ns=-1) -> bool; raises LockHolderDied if the writer holding it died"},
    {"read_unlock", (PyCFunction)rw_read_unlock, METH_NOARGS, "read_unlock(); raises if this object does not hold it for read"},
    {"read_trylock", (PyCFunction)rw_read_trylock, METH_NOARGS, "read_trylock() -> bool"},
    {"read_held", (PyCFunction)rw_read_held, METH_NOARGS, "held for read by this object?"},
    {"readers", (PyCFunction)rw_readers, METH_NOARGS, "readers inside (the shared count)"},
    {"__enter__", (PyCFunction)(void (*)(void))rw_lock, METH_FASTCALL, NULL},
    {"__exit__", (PyCFunction)(void (*)(void))rw_exit, METH_FASTCALL, NULL},
    {NULL}
};

PyTypeObject RwLockType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ipc._prims.RwLock",
    .tp_basicsize = sizeof(LockObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "RwLock(mem, lock_index, stats_index=-1, tag=1, spins=1000, busted=False, name=None): "
              "reader-writer spinlock (rwlock_t); `with lk:` = write lock",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)rw_init,
    .tp_dealloc = (destructor)lock_dealloc,
    .tp_methods = rw_methods,
};
