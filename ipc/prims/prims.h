/*
 * ipc/prims/prims.h -- what the compilation units of ipc._prims share (internal: nothing outside
 * ipc/prims/ includes it).
 *
 * ipc._prims: compiled concurrency primitives on shared-memory buffers.  Everything here operates
 * on 64-bit words of a buffer (normally the mmap of a /dev/shm segment) addressed by word index.
 * The algorithms that use these primitives stay in Python; only the parts that must be fast or
 * must be atomic live here.  One concern per file, as liburcu keeps them:
 *
 *   prims.h      word layouts, the memory-access macros, and the hot helpers every unit inlines
 *                (stats clock reads, virtual-time pricing, Mem busy marks, lock statistics)
 *   clock.c      the stats clock (TSC / cntvct calibration), now_ns, spin_ns, sched_yield
 *   mem.c        Mem: the buffer, word access and atomics, futex wait / wake, barriers
 *   preempt.c    named preemption points inside the primitives (ipc/fuzz.py's hook)
 *   holder.c     holder identity (pid + start time in the lock word) and the common lock head:
 *                init, dead-holder checks, recover(), holder()
 *   spin.c       SpinLock          mutex.c   Mutex (futex)          rwlock.c   RwLock
 *   rcu.c        RcuReader (liburcu-mb read side) and the grace period's reader wait
 *   hist.c       Histogram (log-linear, sampled)
 *   vtime.c      virtual time: the priced clock, the cache-line table, the turnstile
 *   trace.c      the per-process trace ring and the Traced* lock / reader types
 *   module.c     the method table and module init
 *
 * Hot paths (the lock fast paths, the RCU read side, Mem.load / store / fetch_add) use only what
 * this header defines `static inline`: uncontended and off virtual time they run the instructions
 * they ran as one file (the one out-of-line call on a priced path is vt_line, see there).  Shared
 * globals and functions are hidden (below): referenced PC-relative, never through the GOT / PLT.
 *
 * Word layouts used by the C types (declared once here; the Python side takes the sizes from this
 * module's constants: ipc/locks.py, ipc/rcu.py, ipc/hist.py):
 *
 *   lock block (LOCK_WORDS = 8 words, one 64-byte line)
 *     [0] state     0 = free.  High 32 bits: the holder's pid, set by the same atomic
 *                   instruction that takes the lock ("holder identity", holder.c).
 *                   SpinLock: low 32 bits = owner tag.
 *                   Mutex: low 32 bits = futex word (0 free, 1 locked, 2 locked+waiters)
 *     [1] acq_ns    monotonic ns at acquisition (written by the holder only)
 *     [2] owner     Mutex: owner tag while held (SpinLock: unused, state is the owner)
 *     [3] acq_cyc   stats clock (cycle counter, see "Timestamps") at acquisition, holder only
 *     [4] start     the holder's start time (/proc/<pid>/stat field 22), stored by the call that
 *                   took the lock before it returns, cleared by unlock; 0 = free / not readable
 *     [5] readers   RwLock: readers inside (anonymous); its words 0..4 are the writer's, as
 *                   SpinLock keeps them (see rwlock.c).  Others: reserved
 *     [6..7]        reserved
 *
 *   lock-stat block (STAT_WORDS = 16 words, two lines, one per (process, lock class); only
 *   the owning process writes it, readers merge blocks with numpy)
 *     [0] acquisitions [1] contentions [2] wait_total [3] wait_max [4] wait_min
 *     [5] hold_total   [6] hold_max    [7] hold_min     (min words start at INT64_MAX)
 *     [8] holds        completed holds (released): the divisor of the hold average; a hold
 *                      that never ends (its holder died) is an acquisition but not a hold
 *     [9..15]          reserved
 *
 *   RCU domain header (8 words)
 *     [0] gp_ctr    phase bit (bit 32) | GP_COUNT (1), liburcu style
 *     [1] gp_seq    completed grace periods
 *     [2] gp_futex  low 32 bits: -1 while a writer sleeps waiting for readers
 *     [3] gp_state  (ipc/rcu.py) kernel rcu_seq style: 2 * GPs completed + 1 while a GP runs;
 *                   lets overlapping synchronize() callers share a grace period
 *     [4] dead_tag  (ipc/rcu.py) owner tag of the last writer that died holding the gp lock (set
 *                   by the writer that took the lock over; 0 = none)
 *     [5] dead_pid  (ipc/rcu.py) its pid
 *     [6..7]        reserved
 *   RCU reader slot (8 words, one line per process)
 *     [0] ctr       snapshot of gp_ctr | nesting count
 *     [1] owner     owner tag (0 = free slot)
 *     [2] pid, [3] start time of the registered process (ipc/rcu.py)
 *
 *   histogram (HIST_WORDS words): [0] count [1] sum [2] max [3] min, then
 *     HIST_BUCKETS log-linear buckets (8 sub-buckets per power of two).
 *
 * Futex words are the low 32 bits of a 64-bit word: little-endian only
 * (x86-64, aarch64).
 *
 * Timestamps: lock wait/hold times are taken with the CPU's invariant cycle counter when the kernel
 * trusts it (x86-64: rdtsc, if the clocksource is "tsc"; aarch64: cntvct_el0) and converted to ns
 * with a per-process calibration against CLOCK_MONOTONIC that is refined while the process runs;
 * anywhere else with clock_gettime(CLOCK_MONOTONIC).  PTS_PRIMS_CLOCK=monotonic forces the
 * latter.  Every value stored in a stats block or in acq_ns is in ns.
 *
 * Memory ordering: acquire/release for lock words, full barriers (smp_mb) on the RCU read side and
 * at every grace-period step, relaxed stores for single-writer statistics.
 *
 * Virtual time (ipc/vtime.py; vtime.c): once a process attaches its clock (vt_attach), every
 * priced call adds its price to it, the stats clock and now_ns() read it, and the vt_* functions
 * hand the one running turn between processes in the order of their clocks (the `vtime` segment:
 * header, 16-word slots, the line table).  The C lock slow paths refuse to wait then (the
 * turnstile's vt_block does): under virtual time a lock is taken by trylock through ipc/sched/'s
 * SchedLock.
 */

#ifndef PRIMS_H
#define PRIMS_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

/* word indices, spans and counts are Py_ssize_t and stored in int64_t words: one and the same */
_Static_assert(sizeof(Py_ssize_t) == 8, "_prims needs a 64-bit Py_ssize_t (64-bit platform)");
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <linux/futex.h>
#include <sys/syscall.h>

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "ipc._prims needs a little-endian machine (futex word = low half of a 64-bit word)"
#endif

/* Everything declared from here on is internal to the extension: hidden symbols are referenced
 * PC-relative like the statics of a single file (no GOT load, no PLT call, no interposition);
 * only PyInit__prims (PyMODINIT_FUNC: default visibility) is exported. */
#pragma GCC visibility push(hidden)

#define GP_COUNT ((int64_t)1)
#define GP_CTR_PHASE ((int64_t)1 << 32)
#define GP_CTR_NEST_MASK (GP_CTR_PHASE - 1)

#define HIST_SUB_BITS 3
#define HIST_SUB (1 << HIST_SUB_BITS)
#define HIST_BUCKETS ((64 - HIST_SUB_BITS + 1) * HIST_SUB)
#define HIST_HDR 4
#define HIST_WORDS (((HIST_HDR + HIST_BUCKETS) + 7) & ~7)

#define LOCK_WORDS 8
#define STAT_WORDS 16
#define LK_STATE 0
#define LK_ACQ 1
#define LK_OWNER 2
#define LK_ACQ_CYC 3
#define LK_START 4
#define ST_ACQ 0
#define ST_CON 1
#define ST_WTOT 2
#define ST_WMAX 3
#define ST_WMIN 4
#define ST_HTOT 5
#define ST_HMAX 6
#define ST_HMIN 7
#define ST_HOLDS 8

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield" ::: "memory");
#endif
}

static inline int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* ------------------------------------------------------------------ virtual time (vtime.c, ipc/vtime.py)
 * Under `--clock virtual` a vCPU process attaches its clock word (vt_attach): from then on every
 * priced call into this module adds its price (ns) to that word, the stats clock and now_ns()
 * read it, and a touch of a 64-byte line whose last writer was another process adds the line
 * transfer price.  Only one process runs at a time then (ipc/vtime.py hands the turn over), so
 * the shared line table is read and written with plain accesses.  Detached: one branch per call. */
enum { VP_LOAD, VP_STORE, VP_WRITE, VP_RMW, VP_FENCE, VP_FUTEX_WAIT, VP_FUTEX_WAKE, VP_CLOCK,
       VP_LOCK, VP_UNLOCK, VP_RCU_READ, VP_HIST, VP_RELAX, VP_GP_SCAN, VP_LINE, VP_CALL,
       VP_QUANTUM /* not a price: the turnstile's lookahead (vt_quantum) */, VP_N };
extern int64_t *vt_clk;          /* this process' clock word; NULL = real time */
extern int vt_on;                /* charging (vt_enable): off while telemetry runs */
extern int64_t vt_price[VP_N];
extern uint64_t vt_hist_seed;    /* nonzero: histograms made from now on take their phase from it */
#define VT(p) do { if (__builtin_expect(vt_on, 0)) *vt_clk += vt_price[p] + vt_price[VP_CALL]; } while (0)
#define VT_ADD(ns) do { if (__builtin_expect(vt_on, 0)) *vt_clk += (ns); } while (0)
/* vtime.c: a touch of a tracked line.  Out of line in another unit, it is the one call on a priced
 * path the compiler cannot see into: the callers keep no pointer in a register across it (they
 * reload), which moves their register allocation a little; it runs only under virtual time. */
void vt_line(int64_t key, int64_t line, int write);

/* a duration clock: virtual ns when attached, else CLOCK_MONOTONIC */
static inline int64_t clock_ns(void) { return vt_clk ? *vt_clk : now_ns(); }

#define LD(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define LDR(p) __atomic_load_n((p), __ATOMIC_RELAXED)
#define ST(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define STR(p, v) __atomic_store_n((p), (v), __ATOMIC_RELAXED)
#define MB() __atomic_thread_fence(__ATOMIC_SEQ_CST)

/* ------------------------------------------------------------------ stats clock
 * cyc() reads the stats clock (cycles, or ns on the clock_gettime fallback), cyc_ns(d) turns a
 * delta of it into ns, cyc_abs_ns(c) turns a reading into CLOCK_MONOTONIC ns.  Calibration state is
 * per process (inherited by fork); every caller holds the GIL, so plain globals suffice. */
#if (defined(__x86_64__) || defined(__aarch64__)) && !defined(PRIMS_NO_CYCLES)
#define HAVE_CYCLES 1
#endif

enum { CLK_MONO = 0, CLK_CYC = 1 };
/* the calibration (clock.c) */
extern int clk_kind;
extern uint64_t clk_mult;                      /* ns per cycle, 32.32 fixed point */
extern int64_t clk_anchor_cyc, clk_anchor_ns;  /* last re-anchoring on CLOCK_MONOTONIC */
extern int64_t clk_reanchor_cyc;               /* re-anchor after this many cycles (~10 ms) */
extern int64_t clk_last_ns;                    /* cyc_abs_ns() never goes backwards */
int64_t cyc_abs_slow(int64_t c);               /* re-anchor, then convert (out of line) */
void clk_init(void);                           /* calibrate (module init) */
const char *clk_name(void);                    /* "tsc", "cntvct" or "monotonic" */

#ifdef HAVE_CYCLES
static inline int64_t read_cycles(void) {
#if defined(__x86_64__)
    return (int64_t)__builtin_ia32_rdtsc();
#else
    uint64_t v;
    __asm__ __volatile__("mrs %0, cntvct_el0" : "=r"(v));
    return (int64_t)v;
#endif
}
#endif

static inline int64_t cyc(void) {
    if (__builtin_expect(vt_clk != NULL, 0)) return *vt_clk;
#ifdef HAVE_CYCLES
    if (__builtin_expect(clk_kind == CLK_CYC, 1)) return read_cycles();
#endif
    return now_ns();
}

/* non-negative delta of the stats clock -> ns (negative deltas clamp to 0) */
static inline int64_t cyc_ns(int64_t d) {
    if (d <= 0) return 0;
    if (clk_kind != CLK_CYC || vt_clk) return d;
    return (int64_t)(((unsigned __int128)(uint64_t)d * clk_mult) >> 32);
}

static inline int64_t cyc_abs_ns(int64_t c) {
    if (clk_kind != CLK_CYC || vt_clk) return c;
    int64_t d = c - clk_anchor_cyc, v;
    if (__builtin_expect(d >= 0 && d < clk_reanchor_cyc, 1))
        v = clk_anchor_ns + cyc_ns(d);
    else
        v = cyc_abs_slow(c);
    if (v < clk_last_ns) v = clk_last_ns;
    else clk_last_ns = v;
    return v;
}

/* futex helpers: FUTEX_WAIT / FUTEX_WAKE on the low half of a word (process-shared: no
 * FUTEX_PRIVATE_FLAG, the words are in shared memory) */
static inline long futex_wait32(int32_t *addr, int32_t expected, int64_t timeout_ns) {
    struct timespec ts, *tsp = NULL;
    if (timeout_ns >= 0) {
        ts.tv_sec = timeout_ns / 1000000000LL;
        ts.tv_nsec = timeout_ns % 1000000000LL;
        tsp = &ts;
    }
    return syscall(SYS_futex, addr, FUTEX_WAIT, expected, tsp, NULL, 0);
}

static inline long futex_wake32(int32_t *addr, int n) {
    return syscall(SYS_futex, addr, FUTEX_WAKE, n, NULL, NULL, 0);
}

/* stats helpers: single writer per block, relaxed stores suffice */
static inline void stat_add(int64_t *s, int i, int64_t v) { STR(&s[i], LDR(&s[i]) + v); }
static inline void stat_max(int64_t *s, int i, int64_t v) { if (v > LDR(&s[i])) STR(&s[i], v); }
static inline void stat_min(int64_t *s, int i, int64_t v) { if (v < LDR(&s[i])) STR(&s[i], v); }

static inline void stat_wait(int64_t *s, int64_t w) {
    stat_add(s, ST_CON, 1);
    stat_add(s, ST_WTOT, w);
    stat_max(s, ST_WMAX, w);
    stat_min(s, ST_WMIN, w);
}

static inline void stat_hold(int64_t *s, int64_t h) {
    stat_add(s, ST_HOLDS, 1);
    stat_add(s, ST_HTOT, h);
    stat_max(s, ST_HMAX, h);
    stat_min(s, ST_HMIN, h);
}

/* ------------------------------------------------------------------ Mem (mem.c) */

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    int64_t *base;
    Py_ssize_t nwords;
    int has_view;     /* usable (cleared by release()) */
    int holds_view;   /* `view` is held: keeps the buffer (the mapping) alive */
    int busy;         /* calls blocked with the GIL released, holding raw pointers */
    int inited;       /* a Mem is bound to one buffer for life (others keep raw pointers into it) */
    int64_t vkey;     /* virtual time: > 0 its lines are tracked under this key, 0 priced only,
                         -1 exempt (the turnstile's own words) */
} MemObject;

/* the price of one access to word w of m (VT_MEM: only while charging, and m not exempt) */
static inline void vt_mem(MemObject *m, int p, int64_t *w, int write) {
    *vt_clk += vt_price[p] + vt_price[VP_CALL];
    if (m->vkey > 0) vt_line(m->vkey, (w - m->base) >> 3, write);
}
#define VT_MEM(m, p, w, wr) do { if (__builtin_expect(vt_on, 0) && (m)->vkey >= 0) vt_mem((m), (p), (w), (wr)); } while (0)

/* Around every blocking section that drops the GIL while holding raw pointers into the buffer:
 * release() from another thread then only marks the Mem unusable, and the buffer export (which
 * keeps the mapping alive) is dropped when the last blocked call returns. */
static inline void mem_block_begin(MemObject *m) { m->busy++; }
/* after re-taking the GIL: was the Mem released meanwhile?  (then the caller cleans up without
 * touching the buffer after mem_block_end, and returns NULL) */
static inline int mem_released_meanwhile(MemObject *m) {
    if (__builtin_expect(m->has_view, 1)) return 0;
    PyErr_SetString(PyExc_ValueError, "shared memory released (region closed) while waiting on it");
    return 1;
}
static inline void mem_block_end(MemObject *m) {
    if (--m->busy == 0 && !m->has_view && m->holds_view) {
        m->holds_view = 0;
        PyBuffer_Release(&m->view);
    }
}

/* ------------------------------------------------------------------ preemption points (preempt.c) */
enum { PP_RCU_READ_LOCK_AFTER_CTR_LOAD, PP_SPIN_SLOW_AFTER_TRYLOCK, PP_MUTEX_SLOW_AFTER_TRYLOCK,
       PP_MUTEX_SLOW_BEFORE_SLEEP, PP_RW_READ_SLOW_AFTER_BACKOFF, PP_RW_WRITE_SLOW_AFTER_TRYLOCK,
       PP_RW_WRITE_SLOW_AFTER_CLAIM, PP_N };
enum { PP_OK = 0, PP_ERROR = -1, PP_GONE = -2 };
extern PyObject *pp_hook;  /* NULL = points off */
__attribute__((noinline, cold)) int pp_call(MemObject *m, int id, int32_t *wake_on_gone);
/* off: one load of a global and a not-taken branch */
#define PREEMPT_POINT(m, id, wake) (__builtin_expect(pp_hook != NULL, 0) ? pp_call((m), (id), (wake)) : PP_OK)

/* ------------------------------------------------------------------ holder identity (holder.c) */
extern int64_t g_pid_hi;  /* (int64)getpid() << 32 (set at import and in fork children) */
extern int64_t g_start;   /* this process' start time; 0 = unreadable */

/* start time to record (0 if it could not be read: holders are then checked by pid alone) */
static inline int64_t my_start(void) { return g_start; }

#define HOLDER_CHECK_NS (50 * 1000000LL) /* a waiter looks at its holder every 50 ms of waiting */

/* Common head of the lock types: they keep a reference to their Mem. */
typedef struct {
    PyObject_HEAD
    MemObject *mem;
    int64_t *lk;        /* lock block */
    int64_t *st;        /* stats block or NULL */
    int64_t tag;        /* owner tag, 1 .. 2**32-1 */
    int64_t spins;      /* spins before sched_yield */
    int busted;         /* fault injection: lock() does not lock */
    int is_mutex;
    int is_rw;          /* RwLock (the writer side is the SpinLock's) */
    int64_t rd_nest;    /* RwLock: read holds of this object (nesting count; 0 = not held for read) */
    int64_t rd_acq_cyc; /* RwLock: stats clock at the outermost read acquisition (this object's) */
    PyObject *name;     /* str or None: named in errors */
    int traced;         /* a Traced* subtype (trace.c): its slow path emits a wait */
    int tr_waited;      /* traced: this lock() call took the slow path (set by tr_wait_begin) */
} LockObject;

void tr_wait_begin(LockObject *self, int64_t t0); /* trace.c */

#define VT_LOCK(self, p) VT_MEM((self)->mem, (p), (self)->lk, 1)
/* under virtual time a lock is taken with trylock and the wait is the turnstile's (ipc/vtime.py):
 * a C slow path would spin on a holder that cannot run */
#define VT_NO_WAIT(what) \
    if (vt_clk) { PyErr_SetString(PyExc_RuntimeError, what ": would wait in C under virtual time (use the vtime wrapper)"); return NULL; }

/* The lock words live in the Mem's buffer: once the Mem is released (Region.close) the mapping
 * may be gone, so every entry point checks (one predictable branch) instead of faulting. */
static inline int mem_gone(MemObject *m) {
    PyErr_SetString(PyExc_ValueError, m ? "shared memory of this object was released (region closed)"
                                        : "object not initialised");
    return 1;
}
#define MEM_LIVE(m) (__builtin_expect((m) != NULL && (m)->has_view, 1) || !mem_gone(m))

#define LO32(v) ((uint32_t)(uint64_t)(v))
#define HI32(v) ((int64_t)((uint64_t)(v) >> 32))

/* statistics on acquisition / release: one stats-clock read each */
static inline void stat_acquired(LockObject *self, int64_t c) {
    STR(&self->lk[LK_ACQ_CYC], c);
    STR(&self->lk[LK_ACQ], cyc_abs_ns(c));
    stat_add(self->st, ST_ACQ, 1);
}

static inline void stat_released(LockObject *self) {
    stat_hold(self->st, cyc_ns(cyc() - LDR(&self->lk[LK_ACQ_CYC])));
}

/* ------------------------------------------------------------------ trace ring (trace.c) */
#define TR_EV_WORDS 4
enum { TR_PH_B = 1, TR_PH_E = 2, TR_PH_I = 3 };
enum { TR_CAT_OP = 0, TR_CAT_WAIT = 1, TR_CAT_HOLD = 2, TR_CAT_RCU = 3 };
#define TR_CODE(cat, ph, id) (((int64_t)(cat) << 40) | ((int64_t)(ph) << 32) | ((int64_t)(id) & 0xffffffffLL))

/* ------------------------------------------------------------------ across the units */
#define CHECK_NARGS(n, name) \
    if (nargs != (n)) { PyErr_Format(PyExc_TypeError, name "() takes %d arguments (%zd given)", (int)(n), nargs); return NULL; }

static inline int get_i64(PyObject *o, int64_t *out) {
    long long v = PyLong_AsLongLong(o);
    if (v == -1 && PyErr_Occurred()) return -1;
    *out = (int64_t)v;
    return 0;
}

/* the types (module.c readies and adds them) */
extern PyTypeObject MemType, SpinLockType, MutexType, RwLockType, ReaderType, HistType;
extern PyTypeObject tspin_type, tmutex_type, trw_type, TracedRcuReaderType;
extern PyObject *LockHolderDiedError;

/* mem.c */
int64_t *mem_word_at(MemObject *m, Py_ssize_t i, Py_ssize_t span, const char *what);
Py_ssize_t words_span(int64_t n, int64_t per, const char *what);
int refuse_reinit(const char *name);

/* holder.c: the lock head shared by SpinLock, Mutex and RwLock */
int lock_common_init(LockObject *self, PyObject *args, PyObject *kw, const char *name, int is_mutex, int is_rw);
void lock_dealloc(LockObject *self);
int check_holder(LockObject *self);
int parse_timeout(PyObject *const *args, Py_ssize_t nargs, int64_t *deadline);
PyObject *not_holder_error(LockObject *self, int64_t state, int64_t owner);
PyObject *lock_owner(LockObject *self, PyObject *unused);
PyObject *lock_holder(LockObject *self, PyObject *unused);
PyObject *lock_recover(LockObject *self, PyObject *const *args, Py_ssize_t nargs);
void holder_after_fork(void);

/* spin.c, mutex.c, rwlock.c, rcu.c: what the Traced* types (trace.c) wrap */
int spin_init(LockObject *self, PyObject *args, PyObject *kw);
PyObject *spin_lock(LockObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *spin_trylock(LockObject *self, PyObject *unused);
PyObject *spin_unlock(LockObject *self, PyObject *unused);
PyObject *spin_is_held(LockObject *self, PyObject *unused);
int mutex_init(LockObject *self, PyObject *args, PyObject *kw);
PyObject *mutex_lock(LockObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *mutex_trylock(LockObject *self, PyObject *unused);
PyObject *mutex_unlock(LockObject *self, PyObject *unused);
PyObject *mutex_is_held(LockObject *self, PyObject *unused);
int rw_init(LockObject *self, PyObject *args, PyObject *kw);
PyObject *rw_lock(LockObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *rw_trylock(LockObject *self, PyObject *unused);
PyObject *rw_unlock(LockObject *self, PyObject *unused);
PyObject *rw_is_held(LockObject *self, PyObject *unused);
PyObject *rw_recover(LockObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *rw_read_lock(LockObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *rw_read_trylock(LockObject *self, PyObject *unused);
PyObject *rw_read_unlock(LockObject *self, PyObject *unused);

typedef struct {
    PyObject_HEAD
    MemObject *mem;
    int64_t *hdr;
    int64_t *slot;
} ReaderObject;
int reader_init(ReaderObject *self, PyObject *args, PyObject *kw);
PyObject *reader_lock(ReaderObject *self, PyObject *unused);
PyObject *reader_unlock(ReaderObject *self, PyObject *unused);

/* preempt.c, vtime.c: their part of a fork()ed child's reset (module.c: after_fork_child) */
void pp_after_fork(void);
void vt_after_fork(void);
int pp_init_names(void);

/* module-level functions (module.c's method table) */
#define MODFN_O(f) PyObject *f(PyObject *mod, PyObject *arg)
#define MODFN_FAST(f) PyObject *f(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
MODFN_O(m_now_ns); MODFN_O(m_clock_source); MODFN_O(m_stats_clock); MODFN_O(m_stats_clock_ns);
MODFN_O(m_stats_clock_abs_ns); MODFN_O(m_cpu_relax); MODFN_O(m_sched_yield); MODFN_O(m_spin_ns);
MODFN_O(m_nop); MODFN_O(m_smp_mb); MODFN_O(m_self_identity); MODFN_O(m_hist_bucket);
MODFN_O(m_set_preempt_hook); MODFN_O(m_preempt_points); MODFN_FAST(rcu_wait_readers);
MODFN_FAST(m_vt_attach); MODFN_O(m_vt_join); MODFN_O(m_vt_hit); MODFN_FAST(m_vt_exceptions);
MODFN_O(m_vt_block); MODFN_FAST(m_vt_released); MODFN_FAST(m_vt_sleep); MODFN_O(m_vt_spin);
MODFN_FAST(m_vt_kick); MODFN_O(m_vt_done); MODFN_FAST(m_vt_abort); MODFN_O(m_vt_detach);
MODFN_O(m_vt_enable); MODFN_O(m_vt_advance); MODFN_O(m_vt_now); MODFN_O(m_vt_transfers);
MODFN_O(m_vt_seed); MODFN_FAST(m_trace_attach); MODFN_O(m_trace_clock); MODFN_FAST(m_trace_emit);

#pragma GCC visibility pop

#endif /* PRIMS_H */
