/*
 * ipc/prims/holder.c -- holder identity, and the head the three lock kinds share.
 *
 * Holder identity: a lock's holder is recorded inside the C call that takes it: the holder's pid is part of the
 * lock word itself (high 32 bits; set by the same atomic instruction that acquires, so even a
 * SIGKILL right after it leaves the pid behind) and its start time (/proc/<pid>/stat field 22, to
 * tell a dead holder from a live process that reused its pid) goes to LK_START before the call
 * returns.  unlock() clears both in the call that releases.  No Python code (signal handler) can
 * run between acquiring and recording.
 *
 * This process' pid and start time are cached (read once; a fork()ed child refreshes them in a
 * pthread_atfork handler), so the fast path only loads two globals.
 *
 * The lock head (LockObject, prims.h): construction (lock_common_init), the dead-holder checks a
 * waiter runs every HOLDER_CHECK_NS (check_holder -> LockHolderDied), recover() from a dead
 * holder, owner() / holder(), the timeout argument and the "not the holder" error of unlock().
 * The fast paths (spin.c, mutex.c, rwlock.c) take only g_pid_hi and my_start() from here.
 */
#include "prims.h"

int64_t g_pid_hi;   /* (int64)getpid() << 32 (set at import and in fork children) */
int64_t g_start;    /* this process' start time; 0 = unreadable */

/* /proc/<pid>/stat (pid 0: self): state letter and start time.  0 ok, -1 open/read failed (errno
 * set), -2 unparsable.  Plain syscalls and hand-made formatting/parsing: for pid 0 it is
 * async-signal-safe (called in the fork child). */
static int read_proc_stat(int64_t pid, char *state, int64_t *start) {
    char path[48] = "/proc/self/stat", buf[1024];
    if (pid != 0) {
        char digits[24];
        int nd = 0;
        for (uint64_t v = (uint64_t)pid; v && nd < 20; v /= 10) digits[nd++] = (char)('0' + v % 10);
        int k = 6;  /* "/proc/" */
        while (nd) path[k++] = digits[--nd];
        memcpy(path + k, "/stat", 6);
    }
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    int err = errno;
    close(fd);
    if (n <= 0) { errno = n < 0 ? err : ESRCH; return -1; }
    buf[n] = 0;
    char *p = strrchr(buf, ')');  /* comm may contain ')' and spaces: the last one ends it */
    if (!p || p[1] != ' ' || !p[2]) return -2;
    p += 2;
    *state = *p;
    for (int i = 0; i < 19; i++) {  /* field 3 (state) -> field 22 (starttime) */
        p = strchr(p, ' ');
        if (!p) return -2;
        p++;
    }
    int64_t v = 0;
    if (*p < '0' || *p > '9') return -2;
    for (; *p >= '0' && *p <= '9'; p++) v = v * 10 + (*p - '0');
    *start = v;
    return 0;
}

/* this process' identity, at module init and in every fork()ed child (module.c: after_fork_child) */
void holder_after_fork(void) {
    char st;
    int64_t s = 0;
    g_pid_hi = (int64_t)getpid() << 32;
    g_start = (read_proc_stat(0, &st, &s) == 0 && s > 0) ? s : 0;
}

enum { HOLDER_ALIVE = 0, HOLDER_DEAD = 1, HOLDER_REUSED = 2 };

/* Is the process (pid, start) alive?  start 0 = unknown: the pid alone decides.  Zombies are dead
 * (a holder that exited but was not reaped yet); a live pid with another start time was reused. */
static int holder_state(int64_t pid, int64_t start) {
    if (pid <= 0) return HOLDER_ALIVE;  /* nothing recorded: cannot tell */
    if (kill((pid_t)pid, 0) == -1 && errno == ESRCH) return HOLDER_DEAD;
    char st = 0;
    int64_t s = 0;
    /* unreadable (it exited meanwhile, or /proc hides it): the pid alone decides */
    if (read_proc_stat(pid, &st, &s) < 0)
        return (kill((pid_t)pid, 0) == -1 && errno == ESRCH) ? HOLDER_DEAD : HOLDER_ALIVE;
    if (st == 'Z' || st == 'X') return HOLDER_DEAD;
    if (start > 0 && s != start) return HOLDER_REUSED;
    return HOLDER_ALIVE;
}

PyObject *LockHolderDiedError;  /* made by module init */

/* ------------------------------------------------------------------ the lock head */

/* __init__ of SpinLock, Mutex and RwLock: bind the object to its lock block (and stats block) */
int lock_common_init(LockObject *self, PyObject *args, PyObject *kw, const char *name, int is_mutex,
                     int is_rw) {
    static char *kwlist[] = {"mem", "lock_index", "stats_index", "tag", "spins", "busted", "name", NULL};
    PyObject *mem, *lname = Py_None;
    Py_ssize_t li, si = -1;
    long long tag = 1, spins = 1000;
    int busted = 0;
    if (self->mem) return refuse_reinit(name);
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!n|nLLpO", kwlist, &MemType, &mem, &li, &si, &tag,
                                     &spins, &busted, &lname))
        return -1;
    /* again: the argument parsing may have run Python code (__index__ of an index, __bool__ of
     * busted) that initialised this object meanwhile; the early check alone would let this call
     * swap its words all the same */
    if (self->mem) return refuse_reinit(name);
    if (si < -1) {
        PyErr_Format(PyExc_ValueError, "%s: stats_index must be a word index or -1 (none), got %zd", name, si);
        return -1;
    }
    if (tag == 0) { PyErr_Format(PyExc_ValueError, "%s: tag must be nonzero", name); return -1; }
    if (tag < 0 || tag > (long long)UINT32_MAX) {
        PyErr_Format(PyExc_ValueError, "%s: tag must be in 1 .. 2**32-1 (got %lld)", name, tag);
        return -1;
    }
    if (lname != Py_None && !PyUnicode_Check(lname)) {
        PyErr_Format(PyExc_TypeError, "%s: name must be a str or None", name);
        return -1;
    }
    MemObject *m = (MemObject *)mem;
    int64_t *lk = mem_word_at(m, li, LOCK_WORDS, name);
    if (!lk) return -1;
    int64_t *st = NULL;
    if (si >= 0 && !(st = mem_word_at(m, si, STAT_WORDS, name))) return -1;
    Py_INCREF(mem);
    Py_XSETREF(self->mem, m);
    Py_INCREF(lname);
    Py_XSETREF(self->name, lname);
    self->is_mutex = is_mutex;
    self->is_rw = is_rw;
    self->rd_nest = 0;
    self->lk = lk;
    self->st = st;
    self->tag = tag;
    self->spins = spins > 0 ? spins : 1;
    self->busted = busted;
    return 0;
}

static const char *lock_kind(LockObject *self) {
    return self->is_mutex ? "Mutex" : self->is_rw ? "RwLock" : "SpinLock";
}

void lock_dealloc(LockObject *self) {
    Py_XDECREF(self->mem);
    Py_XDECREF(self->name);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* (state word, start time) of one holder: the pid half of the state word is the same before and
 * after reading the start word.  0 if the record keeps changing. */
static int holder_snapshot(int64_t *lk, int64_t *state, int64_t *start) {
    for (int i = 0; i < 1000; i++) {
        int64_t s1 = LD(&lk[LK_STATE]);
        int64_t st = LD(&lk[LK_START]);
        int64_t s2 = LD(&lk[LK_STATE]);
        if (HI32(s1) == HI32(s2) && (LO32(s1) == 0) == (LO32(s2) == 0)) {
            *state = s2;
            *start = st;
            return 1;
        }
        cpu_relax();
    }
    return 0;
}

static int64_t holder_tag(LockObject *self, int64_t state) {
    return self->is_mutex ? LDR(&self->lk[LK_OWNER]) : (int64_t)LO32(state);
}

static void raise_holder_died(LockObject *self, int64_t pid, int64_t start, int64_t tag, int reused) {
    Py_ssize_t word = self->lk - self->mem->base;
    const char *kind = lock_kind(self);
    PyObject *msg;
    const char *why = reused ? " (the pid now belongs to another process: its start time differs, the pid was reused)" : "";
    if (self->name && self->name != Py_None)
        msg = PyUnicode_FromFormat("%s %U (word %zd): its holder, pid %lld (owner tag %lld), died holding it%s",
                                   kind, self->name, word, (long long)pid, (long long)tag, why);
    else
        msg = PyUnicode_FromFormat("%s at word %zd: its holder, pid %lld (owner tag %lld), died holding it%s",
                                   kind, word, (long long)pid, (long long)tag, why);
    if (!msg) return;
    PyObject *exc = PyObject_CallOneArg(LockHolderDiedError, msg);
    Py_DECREF(msg);
    if (!exc) return;
    PyObject *v;
    int bad = 0;
    bad |= !(v = PyLong_FromLongLong(pid)) || PyObject_SetAttrString(exc, "holder_pid", v) < 0;
    Py_XDECREF(v);
    bad |= !(v = PyLong_FromLongLong(start)) || PyObject_SetAttrString(exc, "holder_start", v) < 0;
    Py_XDECREF(v);
    bad |= !(v = PyLong_FromLongLong(tag)) || PyObject_SetAttrString(exc, "owner_tag", v) < 0;
    Py_XDECREF(v);
    bad |= !(v = PyLong_FromSsize_t(word)) || PyObject_SetAttrString(exc, "lock_word", v) < 0;
    Py_XDECREF(v);
    bad |= PyObject_SetAttrString(exc, "lock_name", self->name ? self->name : Py_None) < 0;
    bad |= PyObject_SetAttrString(exc, "pid_reused", reused ? Py_True : Py_False) < 0;
    if (bad) { Py_DECREF(exc); return; }
    PyErr_SetObject(LockHolderDiedError, exc);
    Py_DECREF(exc);
}

/* Waiter side, every HOLDER_CHECK_NS of waiting: -1 with LockHolderDied set if the recorded holder
 * is dead (or its pid was reused) and the record did not change meanwhile (a dead process cannot
 * release, so an unchanged record is still the dead holder's); else 0. */
int check_holder(LockObject *self) {
    int64_t state, start, state2, start2;
    if (!holder_snapshot(self->lk, &state, &start)) return 0;
    int64_t pid = HI32(state);
    if (LO32(state) == 0 || pid == 0) return 0;  /* free, or no holder recorded (raw word) */
    int h = holder_state(pid, start);
    if (h == HOLDER_ALIVE) return 0;
    if (!holder_snapshot(self->lk, &state2, &start2) || LO32(state2) == 0 || HI32(state2) != pid ||
        start2 != start)
        return 0;
    raise_holder_died(self, pid, start, holder_tag(self, state2), h == HOLDER_REUSED);
    return -1;
}

PyObject *lock_owner(LockObject *self, PyObject *unused) {
    if (!MEM_LIVE(self->mem)) return NULL;
    return PyLong_FromLongLong(LO32(LD(&self->lk[LK_STATE])));
}

/* holder() -> (pid, start time) recorded for the current holder, (0, 0) when free */
PyObject *lock_holder(LockObject *self, PyObject *unused) {
    if (!MEM_LIVE(self->mem)) return NULL;
    int64_t state = 0, start = 0;
    if (!holder_snapshot(self->lk, &state, &start) || LO32(state) == 0) state = start = 0;
    return Py_BuildValue("(LL)", (long long)HI32(state), (long long)start);
}

int parse_timeout(PyObject *const *args, Py_ssize_t nargs, int64_t *deadline) {
    *deadline = -1;
    if (nargs > 1) { PyErr_SetString(PyExc_TypeError, "lock(timeout_ns=-1)"); return -1; }
    if (nargs == 1 && args[0] != Py_None) {
        int64_t t;
        if (get_i64(args[0], &t) < 0) return -1;
        if (t >= 0) *deadline = now_ns() + t;
    }
    return 0;
}

/* recover(holder_pid, holder_start) -> bool: take the lock over from a dead holder (the pair a
 * LockHolderDied carried).  Succeeds only if the lock is still recorded as held by exactly that
 * process and that process is dead (or its pid was reused); one of several callers wins.  What
 * the lock protected may be half-updated: only callers that can repair it should use this. */
PyObject *lock_recover(LockObject *self, PyObject *const *args, Py_ssize_t nargs) {
    CHECK_NARGS(2, "recover");
    if (!MEM_LIVE(self->mem)) return NULL;
    int64_t pid, start;
    if (get_i64(args[0], &pid) < 0 || get_i64(args[1], &start) < 0) return NULL;
    if (self->busted || pid <= 0) Py_RETURN_FALSE;
    int64_t *w = &self->lk[LK_STATE];
    int64_t state, st;
    if (!holder_snapshot(self->lk, &state, &st) || LO32(state) == 0 || HI32(state) != pid || st != start)
        Py_RETURN_FALSE;
    if (holder_state(pid, start) == HOLDER_ALIVE) Py_RETURN_FALSE;
    int64_t mystart = my_start();
    /* Claim the start word first (dead holder's start -> 0): until our own start is stored below,
     * the block reads (pid, 0) and a waiter judges by the pid alone, so it can never see our live
     * pid beside the dead holder's start time and take us for a reused pid (and "recover" a lock
     * we hold).  A second recoverer fails here or on the state CAS. */
    int64_t expect = start;
    if (!__atomic_compare_exchange_n(&self->lk[LK_START], &expect, 0, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
        Py_RETURN_FALSE;
    for (;;) {
        int64_t nv = g_pid_hi | (self->is_mutex ? (LO32(state) == 2 ? 2 : 1) : (int64_t)(uint32_t)self->tag);
        if (__atomic_compare_exchange_n(w, &state, nv, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)) break;
        /* retry only for a waiter marking the dead holder's mutex contended (1 -> 2); anything
         * else (released, taken over, a spinlock word changed) means it is no longer ours to take */
        if (!self->is_mutex || HI32(state) != pid || LO32(state) != 2) Py_RETURN_FALSE;
    }
    STR(&self->lk[LK_START], mystart);
    if (self->is_mutex) STR(&self->lk[LK_OWNER], self->tag);
    if (self->st) stat_acquired(self, cyc());
    Py_RETURN_TRUE;
}

/* unlock() by an object that does not hold the lock (this tag in this process) */
PyObject *not_holder_error(LockObject *self, int64_t state, int64_t owner) {
    PyErr_Format(PyExc_RuntimeError, "%s: unlock by tag %lld (pid %lld) but owner is %lld (pid %lld)",
                 lock_kind(self), (long long)self->tag, (long long)HI32(g_pid_hi),
                 (long long)owner, (long long)(LO32(state) ? HI32(state) : 0));
    return NULL;
}

/* ------------------------------------------------------------------ module functions */

/* self_identity() -> (pid, start time) this process records as a lock holder */
PyObject *m_self_identity(PyObject *mod, PyObject *unused) {
    return Py_BuildValue("(LL)", (long long)HI32(g_pid_hi), (long long)my_start());
}
