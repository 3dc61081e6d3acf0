/*
 * ipc._prims -- compiled concurrency primitives on shared-memory buffers.
 *
 * Everything here operates on 64-bit words of a buffer (normally the mmap of a
 * multiprocessing.shared_memory / /dev/shm segment) addressed by word index.
 * The algorithms that use these primitives stay in Python; only the parts that
 * must be fast or must be atomic live here.
 *
 * Word layouts used by the C types (declared once, mirrored in ipc/layout.py):
 *
 *   lock block (LOCK_WORDS = 8 words, one 64-byte line)
 *     [0] state     0 = free.  High 32 bits: the holder's pid, set by the same atomic
 *                   instruction that takes the lock ("holder identity" below).
 *                   SpinLock: low 32 bits = owner tag.
 *                   Mutex: low 32 bits = futex word (0 free, 1 locked, 2 locked+waiters)
 *     [1] acq_ns    monotonic ns at acquisition (written by the holder only)
 *     [2] owner     Mutex: owner tag while held (SpinLock: unused, state is the owner)
 *     [3] acq_cyc   stats clock (cycle counter, see "Timestamps") at acquisition, holder only
 *     [4] start     the holder's start time (/proc/<pid>/stat field 22), stored by the call that
 *                   took the lock before it returns, cleared by unlock; 0 = free / not readable
 *     [5] readers   RwLock: readers inside (anonymous); its words 0..4 are the writer's, as
 *                   SpinLock keeps them (see the RwLock section).  Others: reserved
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
 * Virtual time (ipc/vtime.py, section "virtual time" and "the turnstile" below): once a process
 * attaches its clock (vt_attach), every priced call adds its price to it, the stats clock and
 * now_ns() read it, and the vt_* functions hand the one running turn between processes in the
 * order of their clocks (the `vtime` segment: header, 16-word slots, the line table).  The C lock
 * slow paths refuse to wait then (the turnstile's vt_block does): under virtual time a lock is
 * taken by trylock through ipc/sched.py's SchedLock.
 */
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

/* ------------------------------------------------------------------ virtual time (ipc/vtime.py)
 * Under `--clock virtual` a vCPU process attaches its clock word (vt_attach): from then on every
 * priced call into this module adds its price (ns) to that word, the stats clock and now_ns()
 * read it, and a touch of a 64-byte line whose last writer was another process adds the line
 * transfer price.  Only one process runs at a time then (ipc/vtime.py hands the turn over), so
 * the shared line table is read and written with plain accesses.  Detached: one branch per call. */
enum { VP_LOAD, VP_STORE, VP_WRITE, VP_RMW, VP_FENCE, VP_FUTEX_WAIT, VP_FUTEX_WAKE, VP_CLOCK,
       VP_LOCK, VP_UNLOCK, VP_RCU_READ, VP_HIST, VP_RELAX, VP_GP_SCAN, VP_LINE, VP_CALL,
       VP_QUANTUM /* not a price: the turnstile's lookahead (vt_quantum) */, VP_N };
static int64_t *vt_clk;          /* this process' clock word; NULL = real time */
static int vt_on;                /* charging (vt_enable): off while telemetry runs */
static int64_t vt_price[VP_N];
static int64_t *vt_lines;        /* shared line table: (tag, writer | version << 16 | shared << 15) pairs */
static int64_t vt_line_mask;     /* entries - 1 (a power of two) */
static int64_t vt_me;            /* this process' index (< 32768) */
static PyObject *vt_owner;       /* the Mem holding vt_clk / vt_lines (a reference) */
static int vt_pinned;            /* vt_owner's busy count holds one for the attached clock (vt_unpin) */
static int vt_waiting;           /* vt_wait_turn calls in progress (parked, or a signal handler run from one) */
static unsigned vt_fork_gen;     /* bumped in every fork()ed child: a wait begun before the fork is not ours */
static int64_t vt_transfers;     /* line transfers this process paid (for the results) */
static uint64_t vt_hist_seed;    /* nonzero: histograms made from now on take their phase from it */
#define VT_SEEN 4096
static int64_t vt_seen_tag[VT_SEEN], vt_seen_ver[VT_SEEN];  /* lines this process holds a copy of */
#define VT(p) do { if (__builtin_expect(vt_on, 0)) *vt_clk += vt_price[p] + vt_price[VP_CALL]; } while (0)
#define VT_ADD(ns) do { if (__builtin_expect(vt_on, 0)) *vt_clk += (ns); } while (0)

/* a touch of line `line` of the segment with key `key`: the transfer price if another process
 * wrote it last and this one holds no copy of that version (reads), or holds no exclusive copy
 * (writes: another process wrote or read it since this one's last write) */
static void vt_line(int64_t key, int64_t line, int write) {
    uint64_t k = ((uint64_t)key * 0x9E3779B97F4A7C15ULL) ^ ((uint64_t)line * 0xBF58476D1CE4E5B9ULL);
    k ^= k >> 29;
    int64_t tag = (int64_t)(k | 1);
    int64_t *e = &vt_lines[2 * (int64_t)(k & (uint64_t)vt_line_mask)];
    int64_t v = e[1];
    if (e[0] != tag) {  /* a new line (or a collision): nobody holds it; the version goes on growing,
                         * so that no copy of the evicted line's passes for one of this one */
        e[0] = tag;
        v = ((v >> 16) + 1) << 16;
        e[1] = v;
    }
    int64_t writer = (v & 0x7fff) - 1, ver = v >> 16, shared = (v >> 15) & 1;
    int s = (int)(k >> 40) & (VT_SEEN - 1);
    if (write) {
        if ((writer >= 0 && writer != vt_me) || shared) {
            *vt_clk += vt_price[VP_LINE];
            vt_transfers++;
        }
        if (writer != vt_me || shared) ver++;
        e[1] = (ver << 16) | (vt_me + 1);
        vt_seen_tag[s] = tag;
        vt_seen_ver[s] = ver;
    } else if (writer >= 0 && writer != vt_me && !(vt_seen_tag[s] == tag && vt_seen_ver[s] == ver)) {
        *vt_clk += vt_price[VP_LINE];
        vt_transfers++;
        e[1] = v | (1 << 15);
        vt_seen_tag[s] = tag;
        vt_seen_ver[s] = ver;
    }
}

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
static int clk_kind = CLK_MONO;
static uint64_t clk_mult;                      /* ns per cycle, 32.32 fixed point */
#ifdef HAVE_CYCLES
static int64_t clk_base_cyc, clk_base_ns;      /* calibration origin (module init) */
#endif
static int64_t clk_anchor_cyc, clk_anchor_ns;  /* last re-anchoring on CLOCK_MONOTONIC */
static int64_t clk_reanchor_cyc;               /* re-anchor after this many cycles (~10 ms) */
static int64_t clk_last_ns;                    /* cyc_abs_ns() never goes backwards */
#define CLK_REANCHOR_NS 10000000LL

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

#ifdef HAVE_CYCLES
/* one (cycles, ns) pair: the tightest of a few cycle brackets around clock_gettime */
static void clk_sample(int64_t *c, int64_t *ns) {
    int64_t best = INT64_MAX;
    for (int i = 0; i < 3; i++) {
        int64_t c1 = read_cycles(), n = now_ns(), c2 = read_cycles();
        if (c2 - c1 < best) {
            best = c2 - c1;
            *c = c1 + (c2 - c1) / 2;
            *ns = n;
        }
    }
}

/* new anchor; the rate is re-measured from the origin, so it gets more precise as time passes */
static void clk_anchor(int64_t c, int64_t n) {
    int64_t dc = c - clk_base_cyc, dn = n - clk_base_ns;
    if (dc > 0 && dn > 0) {
        clk_mult = (uint64_t)(((unsigned __int128)(uint64_t)dn << 32) / (uint64_t)dc);
        clk_reanchor_cyc = (int64_t)(((unsigned __int128)CLK_REANCHOR_NS * (uint64_t)dc) / (uint64_t)dn);
    }
    clk_anchor_cyc = c;
    clk_anchor_ns = n;
}

static int64_t cyc_abs_slow(int64_t c) {
    int64_t ac, an;
    clk_sample(&ac, &an);
    clk_anchor(ac, an);
    return c >= ac ? an + cyc_ns(c - ac) : an - cyc_ns(ac - c);
}
#else
static int64_t cyc_abs_slow(int64_t c) { return c; }
#endif

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

static void clk_init(void) {
    clk_kind = CLK_MONO;
#ifdef HAVE_CYCLES
    const char *env = getenv("PTS_PRIMS_CLOCK");
    if (env && strcmp(env, "monotonic") == 0) return;
#if defined(__x86_64__)
    /* the TSC is usable across CPUs only if the kernel itself trusts it as its clocksource */
    if (!(env && strcmp(env, "cycles") == 0)) {
        char buf[32] = {0};
        FILE *f = fopen("/sys/devices/system/clocksource/clocksource0/current_clocksource", "r");
        int ok = 0;
        if (f) {
            if (fgets(buf, sizeof buf, f) && strcmp(buf, "tsc\n") == 0) ok = 1;
            fclose(f);
        }
        if (!ok) return;
    }
#endif
    int64_t c0, n0, c1, n1;
    clk_sample(&c0, &n0);
    do clk_sample(&c1, &n1); while (n1 - n0 < 1000000);  /* ~1 ms */
    /* plausible counter: 1 MHz .. 100 GHz */
    if (c1 - c0 < (n1 - n0) / 1000 || c1 - c0 > (n1 - n0) * 100) return;
    clk_base_cyc = c0;
    clk_base_ns = n0;
    clk_anchor(c1, n1);
    clk_last_ns = n1;
    clk_kind = CLK_CYC;
#endif
}

static const char *clk_name(void) {
    if (clk_kind != CLK_CYC) return "monotonic";
#if defined(__x86_64__)
    return "tsc";
#elif defined(__aarch64__)
    return "cntvct";
#else
    return "cycles";
#endif
}

static long futex_wait32(int32_t *addr, int32_t expected, int64_t timeout_ns) {
    struct timespec ts, *tsp = NULL;
    if (timeout_ns >= 0) {
        ts.tv_sec = timeout_ns / 1000000000LL;
        ts.tv_nsec = timeout_ns % 1000000000LL;
        tsp = &ts;
    }
    return syscall(SYS_futex, addr, FUTEX_WAIT, expected, tsp, NULL, 0);
}

static long futex_wake32(int32_t *addr, int n) {
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

/* ------------------------------------------------------------------ Mem */

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

static void vt_mem(MemObject *m, int p, int64_t *w, int write) {
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

/* ------------------------------------------------------------------ preemption points (ipc/fuzz.py)
 * Named points inside the multi-step sequences below (the RCU read-side entry between loading the
 * gp counter and storing the slot; the lock slow paths between the failed try and the wait).  Off
 * (pp_hook == NULL, the default) a point is one load of a global and a not-taken branch.  On
 * (set_preempt_hook(callable)), the hook is called with the point's name (a str made once) with
 * the GIL held, while the primitive holds nothing that another process needs to make progress (no
 * spin lock; a Mutex waiter has at most marked the futex word contended, which every waiter does):
 * ipc/fuzz.py routes it to the Python points (--fuzz widening, explore's scheduling points, the
 * torture readers' delays).  An exception from the hook (ScheduleAborted, SystemExit, ...) ends the
 * C call with NULL; every point states next to it why the primitive is then consistent.
 *
 * The hook may release the GIL (sleep, futex wait): the Mem is marked busy around the call, as
 * around every blocking section, and if it was released meanwhile the call fails without touching
 * the buffer again (pp_call returns PP_GONE).  Points reached while a hook call is in progress (the
 * hook's own primitives, or another thread while the hook has dropped the GIL) are skipped: the
 * hook is never re-entered.  The hook is inherited by fork()ed children, as fuzz.ACTIVE is. */
enum { PP_RCU_READ_LOCK_AFTER_CTR_LOAD, PP_SPIN_SLOW_AFTER_TRYLOCK, PP_MUTEX_SLOW_AFTER_TRYLOCK,
       PP_MUTEX_SLOW_BEFORE_SLEEP, PP_RW_READ_SLOW_AFTER_BACKOFF, PP_RW_WRITE_SLOW_AFTER_TRYLOCK,
       PP_RW_WRITE_SLOW_AFTER_CLAIM, PP_N };
static const char *const pp_names[PP_N] = {
    "rcu.read_lock.after_ctr_load", "spin.slow.after_trylock", "mutex.slow.after_trylock",
    "mutex.slow.before_sleep", "rw.read.slow.after_backoff", "rw.write.slow.after_trylock",
    "rw.write.slow.after_claim"};
static PyObject *pp_str[PP_N];  /* the names as str (module init) */
static PyObject *pp_hook;       /* NULL = points off */
static int pp_running;          /* a hook call is in progress */
static MemObject *pp_mem;       /* ... on this Mem (busy) */
static pthread_t pp_thread;     /* ... in this thread (a fork()ed child keeps only the forking thread) */
enum { PP_OK = 0, PP_ERROR = -1, PP_GONE = -2 };

/* Call the hook at point `id` of a primitive working on `m`'s words.  PP_OK; PP_ERROR: the hook
 * raised (exception set; the buffer is still mapped); PP_GONE: the Mem was released while the hook
 * ran (exception set; the caller must not touch the buffer).  `wake_on_gone`: a futex word to wake
 * one waiter on before the buffer may go (a Mutex waiter never swallows a wake-up). */
static int64_t g_pid_hi;   /* (int64)getpid() << 32 (set at import and in fork children) */

static __attribute__((noinline, cold)) int pp_call(MemObject *m, int id, int32_t *wake_on_gone) {
    if (pp_running || !pp_hook || vt_clk) return PP_OK;  /* never under virtual time (ipc/vtime.py) */
    int64_t pid_before = g_pid_hi;
    PyObject *h = pp_hook;
    Py_INCREF(h);  /* the hook may replace itself (set_preempt_hook(None)) */
    pp_running = 1;
    pp_mem = m;
    pp_thread = pthread_self();
    mem_block_begin(m);
    PyObject *r = PyObject_CallOneArg(h, pp_str[id]);
    pp_running = 0;
    Py_DECREF(h);
    if (!m->has_view) {
        if (r) {
            Py_DECREF(r);
            mem_released_meanwhile(m);  /* sets the ValueError */
        }
        if (wake_on_gone) futex_wake32(wake_on_gone, 1);
        mem_block_end(m);
        return PP_GONE;
    }
    mem_block_end(m);
    if (!r) return PP_ERROR;
    Py_DECREF(r);
    if (g_pid_hi != pid_before) {  /* the hook fork()ed: this child must not carry on the parent's
                                      primitive (its identity, claim or slot are the parent's) */
        PyErr_SetString(PyExc_RuntimeError, "fork() inside a preemption point: the child does not go on "
                        "with the parent's lock / RCU call");
        return PP_GONE;
    }
    return PP_OK;
}
#define PREEMPT_POINT(m, id, wake) (__builtin_expect(pp_hook != NULL, 0) ? pp_call((m), (id), (wake)) : PP_OK)

static PyObject *m_set_preempt_hook(PyObject *mod, PyObject *hook) {
    if (hook != Py_None && !PyCallable_Check(hook)) {
        PyErr_SetString(PyExc_TypeError, "set_preempt_hook: need a callable(name) or None");
        return NULL;
    }
    PyObject *old = pp_hook;
    pp_hook = hook == Py_None ? NULL : Py_NewRef(hook);
    return old ? old : Py_NewRef(Py_None);  /* the reference pp_hook held */
}

static PyObject *m_preempt_points(PyObject *mod, PyObject *unused) {
    PyObject *t = PyTuple_New(PP_N);
    if (!t) return NULL;
    for (int i = 0; i < PP_N; i++) PyTuple_SET_ITEM(t, i, Py_NewRef(pp_str[i]));
    return t;
}

static PyTypeObject MemType;

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
static int64_t *mem_word_at(MemObject *m, Py_ssize_t i, Py_ssize_t span, const char *what) {
    if (!m->has_view) { PyErr_SetString(PyExc_ValueError, "Mem: released"); return NULL; }
    if (i < 0 || span < 0 || span > m->nwords || i > m->nwords - span) {
        PyErr_Format(PyExc_IndexError, "%s: %zd words at word %zd outside buffer of %zd words",
                     what, span, i, m->nwords);
        return NULL;
    }
    return &m->base[i];
}

/* n * per words as a span for mem_word_at; -1 with IndexError set if it does not fit */
static Py_ssize_t words_span(int64_t n, int64_t per, const char *what) {
    int64_t span;
    if (n < 0 || per < 0 || __builtin_mul_overflow(n, per, &span) || span > PY_SSIZE_T_MAX) {
        PyErr_Format(PyExc_IndexError, "%s: %lld x %lld words do not fit any buffer", what, (long long)n,
                     (long long)per);
        return -1;
    }
    return (Py_ssize_t)span;
}

static int get_i64(PyObject *o, int64_t *out) {
    long long v = PyLong_AsLongLong(o);
    if (v == -1 && PyErr_Occurred()) return -1;
    *out = (int64_t)v;
    return 0;
}

#define CHECK_NARGS(n, name) \
    if (nargs != (n)) { PyErr_Format(PyExc_TypeError, name "() takes %d arguments (%zd given)", (int)(n), nargs); return NULL; }

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

static PyTypeObject MemType = {
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

/* ------------------------------------------------------------------ holder identity
 * A lock's holder is recorded inside the C call that takes it: the holder's pid is part of the
 * lock word itself (high 32 bits; set by the same atomic instruction that acquires, so even a
 * SIGKILL right after it leaves the pid behind) and its start time (/proc/<pid>/stat field 22, to
 * tell a dead holder from a live process that reused its pid) goes to LK_START before the call
 * returns.  unlock() clears both in the call that releases.  No Python code (signal handler) can
 * run between acquiring and recording.
 *
 * This process' pid and start time are cached (read once; a fork()ed child refreshes them in a
 * pthread_atfork handler), so the fast path only loads two globals. */
static int64_t g_start;    /* this process' start time; 0 = unreadable */
static void after_fork_child(void);

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

/* this process' identity, at module init and in every fork()ed child (pthread_atfork) */
static void after_fork_child(void) {
    char st;
    int64_t s = 0;
    g_pid_hi = (int64_t)getpid() << 32;
    g_start = (read_proc_stat(0, &st, &s) == 0 && s > 0) ? s : 0;
    /* the threads parked in vt_wait_turn are not in this child: their counts go (the Mem's busy
     * count keeps the clock's pin, so nothing is released here) */
    if (vt_waiting && vt_owner) ((MemObject *)vt_owner)->busy -= vt_waiting;
    vt_waiting = 0;
    vt_fork_gen++;
    /* a hook call of another thread is not in this child: its point and its busy count go (a
     * fork() from inside the hook, in this thread, returns to it and ends the call itself) */
    if (pp_running && !pthread_equal(pp_thread, pthread_self())) {
        pp_mem->busy--;
        pp_running = 0;
    }
}

/* start time to record (0 if it could not be read: holders are then checked by pid alone) */
static inline int64_t my_start(void) { return g_start; }

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

#define HOLDER_CHECK_NS (50 * 1000000LL) /* a waiter looks at its holder every 50 ms of waiting */

static PyObject *LockHolderDiedError;

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
    int traced;         /* a Traced* subtype (trace section at the end): its slow path emits a wait */
    int tr_waited;      /* traced: this lock() call took the slow path (set by tr_wait_begin) */
} LockObject;

static void tr_wait_begin(LockObject *self, int64_t t0); /* trace section at the end of this file */

#define VT_LOCK(self, p) VT_MEM((self)->mem, (p), (self)->lk, 1)
/* under virtual time a lock is taken with trylock and the wait is the turnstile's (ipc/vtime.py):
 * a C slow path would spin on a holder that cannot run */
#define VT_NO_WAIT(what) \
    if (vt_clk) { PyErr_SetString(PyExc_RuntimeError, what ": would wait in C under virtual time (use the vtime wrapper)"); return NULL; }

/* "already initialised": a second __init__ would swap the Mem and the words under a call of another
 * thread blocked in this object (GIL released, holding its old pointers and the old Mem's busy
 * count): a use after unmap.  Every type holding pointers into a Mem is bound once for life. */
static int refuse_reinit(const char *name) {
    PyErr_Format(PyExc_RuntimeError, "%s: already initialised (its words are bound for life)", name);
    return -1;
}

static int lock_common_init(LockObject *self, PyObject *args, PyObject *kw, const char *name, int is_mutex,
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

static void lock_dealloc(LockObject *self) {
    Py_XDECREF(self->mem);
    Py_XDECREF(self->name);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The lock words live in the Mem's buffer: once the Mem is released (Region.close) the mapping
 * may be gone, so every entry point checks (one predictable branch) instead of faulting. */
static int mem_gone(MemObject *m) {
    PyErr_SetString(PyExc_ValueError, m ? "shared memory of this object was released (region closed)"
                                        : "object not initialised");
    return 1;
}
#define MEM_LIVE(m) (__builtin_expect((m) != NULL && (m)->has_view, 1) || !mem_gone(m))

#define LO32(v) ((uint32_t)(uint64_t)(v))
#define HI32(v) ((int64_t)((uint64_t)(v) >> 32))

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
static int check_holder(LockObject *self) {
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

static PyObject *lock_owner(LockObject *self, PyObject *unused) {
    if (!MEM_LIVE(self->mem)) return NULL;
    return PyLong_FromLongLong(LO32(LD(&self->lk[LK_STATE])));
}

/* holder() -> (pid, start time) recorded for the current holder, (0, 0) when free */
static PyObject *lock_holder(LockObject *self, PyObject *unused) {
    if (!MEM_LIVE(self->mem)) return NULL;
    int64_t state = 0, start = 0;
    if (!holder_snapshot(self->lk, &state, &start) || LO32(state) == 0) state = start = 0;
    return Py_BuildValue("(LL)", (long long)HI32(state), (long long)start);
}

static inline int deadline_passed(int64_t deadline) { return deadline >= 0 && now_ns() >= deadline; }

static int parse_timeout(PyObject *const *args, Py_ssize_t nargs, int64_t *deadline) {
    *deadline = -1;
    if (nargs > 1) { PyErr_SetString(PyExc_TypeError, "lock(timeout_ns=-1)"); return -1; }
    if (nargs == 1 && args[0] != Py_None) {
        int64_t t;
        if (get_i64(args[0], &t) < 0) return -1;
        if (t >= 0) *deadline = now_ns() + t;
    }
    return 0;
}

/* statistics on acquisition / release: one stats-clock read each */
static inline void stat_acquired(LockObject *self, int64_t c) {
    STR(&self->lk[LK_ACQ_CYC], c);
    STR(&self->lk[LK_ACQ], cyc_abs_ns(c));
    stat_add(self->st, ST_ACQ, 1);
}

static inline void stat_released(LockObject *self) {
    stat_hold(self->st, cyc_ns(cyc() - LDR(&self->lk[LK_ACQ_CYC])));
}

/* recover(holder_pid, holder_start) -> bool: take the lock over from a dead holder (the pair a
 * LockHolderDied carried).  Succeeds only if the lock is still recorded as held by exactly that
 * process and that process is dead (or its pid was reused); one of several callers wins.  What
 * the lock protected may be half-updated: only callers that can repair it should use this. */
static PyObject *lock_recover(LockObject *self, PyObject *const *args, Py_ssize_t nargs) {
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

/* ------------------------------------------------------------------ SpinLock */

static PyTypeObject SpinLockType;

static int spin_init(LockObject *self, PyObject *args, PyObject *kw) {
    return lock_common_init(self, args, kw, "SpinLock", 0, 0);
}

/* lock(timeout_ns=-1) -> True, or False on timeout.  Test-and-test-and-set with pause,
 * sched_yield after `spins` polls; Python signal handlers run while waiting; raises LockHolderDied
 * if the holder is found dead (checked every HOLDER_CHECK_NS of waiting). */
static PyObject *spin_lock(LockObject *self, PyObject *const *args, Py_ssize_t nargs) {
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

static PyObject *spin_trylock(LockObject *self, PyObject *unused) {
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

static PyObject *not_holder_error(LockObject *self, int64_t state, int64_t owner) {
    PyErr_Format(PyExc_RuntimeError, "%s: unlock by tag %lld (pid %lld) but owner is %lld (pid %lld)",
                 lock_kind(self), (long long)self->tag, (long long)HI32(g_pid_hi),
                 (long long)owner, (long long)(LO32(state) ? HI32(state) : 0));
    return NULL;
}

static PyObject *spin_unlock(LockObject *self, PyObject *unused) {
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
static PyObject *spin_is_held(LockObject *self, PyObject *unused) {
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

static PyTypeObject SpinLockType = {
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

/* ------------------------------------------------------------------ Mutex (Drepper "mutex3")
 * The futex word is the low half of the state word; the high half is the holder's pid.  Every
 * transition is a 64-bit atomic on the whole word (the kernel's FUTEX_WAIT compares the low
 * half): 0 -> pid|1 (uncontended), x -> pid|2 (taken contended), pid|1 -> pid|2 (a waiter marks it
 * contended, the pid stays), unlock: xchg(0), wake one if it was 2. */

static PyTypeObject MutexType;

static int mutex_init(LockObject *self, PyObject *args, PyObject *kw) {
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

static PyObject *mutex_lock(LockObject *self, PyObject *const *args, Py_ssize_t nargs) {
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

static PyObject *mutex_trylock(LockObject *self, PyObject *unused) {
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

static PyObject *mutex_unlock(LockObject *self, PyObject *unused) {
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
static PyObject *mutex_is_held(LockObject *self, PyObject *unused) {
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

static PyTypeObject MutexType = {
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

/* ------------------------------------------------------------------ RwLock
 * A reader-writer spinlock (the kernel's rwlock_t; x86-64 KVM's kvm->mmu_lock is one, with
 * KVM_HAVE_MMU_RWLOCK).  Any number of readers or one writer.  Only the LOCK_WORDS words of the
 * lock block:
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
 * this object's own acquisition time; nested read_locks are not acquisitions. */

#define LK_READERS 5

static PyTypeObject RwLockType;

static int rw_init(LockObject *self, PyObject *args, PyObject *kw) {
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
static PyObject *rw_lock(LockObject *self, PyObject *const *args, Py_ssize_t nargs) {
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

static PyObject *rw_trylock(LockObject *self, PyObject *unused) {
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
static PyObject *rw_unlock(LockObject *self, PyObject *unused) { return spin_unlock(self, unused); }
static PyObject *rw_is_held(LockObject *self, PyObject *unused) { return spin_is_held(self, unused); }

static PyObject *rw_exit(LockObject *self, PyObject *const *args, Py_ssize_t nargs) {
    return rw_unlock(self, NULL);
}

/* recover(holder_pid, holder_start): SpinLock's takeover of the writer field, then the drain (the
 * dead writer may have died before the readers left).  The drain has no timeout; a signal ends
 * it: the lock is released again and the exception raised. */
static PyObject *rw_recover(LockObject *self, PyObject *const *args, Py_ssize_t nargs) {
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
static PyObject *rw_read_lock(LockObject *self, PyObject *const *args, Py_ssize_t nargs) {
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

static PyObject *rw_read_trylock(LockObject *self, PyObject *unused) {
    if (!MEM_LIVE(self->mem)) return NULL;
    VT_LOCK(self, VP_LOCK);
    if (self->rd_nest > 0) { self->rd_nest++; Py_RETURN_TRUE; }
    if (self->busted) { self->rd_nest = 1; Py_RETURN_TRUE; }
    if (!rw_read_enter(self->lk)) Py_RETURN_FALSE;
    rw_read_acquired(self);
    Py_RETURN_TRUE;
}

static PyObject *rw_read_unlock(LockObject *self, PyObject *unused) {
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

static PyTypeObject RwLockType = {
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

/* ------------------------------------------------------------------ RCU reader */

typedef struct {
    PyObject_HEAD
    MemObject *mem;
    int64_t *hdr;
    int64_t *slot;
} ReaderObject;

static PyTypeObject ReaderType;

static int reader_init(ReaderObject *self, PyObject *args, PyObject *kw) {
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

static PyObject *reader_lock(ReaderObject *self, PyObject *unused) {
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

static PyObject *reader_unlock(ReaderObject *self, PyObject *unused) {
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

static PyTypeObject ReaderType = {
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
static PyObject *rcu_wait_readers(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
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

/* ------------------------------------------------------------------ Histogram */

static inline int hist_bucket(int64_t v) {
    if (v < HIST_SUB) return v < 0 ? 0 : (int)v;
    int msb = 63 - __builtin_clzll((unsigned long long)v);
    return (msb - HIST_SUB_BITS + 1) * HIST_SUB + (int)((v >> (msb - HIST_SUB_BITS)) & (HIST_SUB - 1));
}

/* Sampled latency (every = N > 1): the caller counts operations down from the interval the
 * histogram hands out (uniform in 1..2N-1, mean N, so a sample never locks onto a period of the
 * workload) and times only the one that reaches 0; sample(c0) records that value with the
 * interval's length as its weight (count, sum and bucket grow by the weight), so counts stay exact
 * and quantiles are those of the sampled values; settle(left) adds the operations of the interval
 * that have run so far but were not sampled yet (at every counter flush: the count is exact then).
 * every = 1: every operation is timed, weight 1 (the exact histogram). */
typedef struct {
    PyObject_HEAD
    MemObject *mem;
    int64_t *h;
    int64_t every;  /* mean sampling interval N (1 = every operation) */
    int64_t cur;    /* length of the interval handed out last, not yet in the count */
    uint64_t rng;   /* xorshift64* state of the interval choice (this process) */
} HistObject;

static PyTypeObject HistType;

static int hist_init(HistObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"mem", "index", "every", NULL};
    PyObject *mem;
    Py_ssize_t hi;
    long long every = 1;
    if (self->mem) return refuse_reinit("Histogram");
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!n|L", kwlist, &MemType, &mem, &hi, &every)) return -1;
    if (every < 1 || every > (1LL << 30)) {
        PyErr_SetString(PyExc_ValueError, "Histogram: every must be 1..2**30");
        return -1;
    }
    int64_t *h = mem_word_at((MemObject *)mem, hi, HIST_WORDS, "Histogram");
    if (!h) return -1;
    if (self->mem) return refuse_reinit("Histogram");  /* initialised by __index__ meanwhile */
    Py_INCREF(mem);
    Py_XSETREF(self->mem, (MemObject *)mem);
    self->h = h;
    self->every = every;
    self->cur = 0;
    /* virtual time (vt_seed): the sampling phase follows the run's seed and the word, not the host */
    self->rng = (vt_hist_seed ? vt_hist_seed * 0x9E3779B97F4A7C15ULL ^ (uint64_t)hi * 0xBF58476D1CE4E5B9ULL
                              : (uint64_t)now_ns() ^ ((uint64_t)getpid() << 32) ^ (uint64_t)(uintptr_t)h) | 1;
    return 0;
}

static void hist_dealloc(HistObject *self) {
    Py_XDECREF(self->mem);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* one value standing for w operations (w = 1: an exact record) */
static inline void hist_put_w(int64_t *h, int64_t v, int64_t w) {
    STR(&h[0], LDR(&h[0]) + w);
    STR(&h[1], LDR(&h[1]) + v * w);
    if (v > LDR(&h[2])) STR(&h[2], v);
    if (v < LDR(&h[3])) STR(&h[3], v);
    int b = hist_bucket(v);
    STR(&h[HIST_HDR + b], LDR(&h[HIST_HDR + b]) + w);
}

static inline void hist_put(int64_t *h, int64_t v) { hist_put_w(h, v, 1); }

/* next sampling interval: uniform in 1..2*every-1 (mean every) */
static inline int64_t hist_interval(HistObject *self) {
    if (self->every == 1) return 1;
    uint64_t x = self->rng;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    self->rng = x;
    return 1 + (int64_t)(((x * 0x2545F4914F6CDD1DULL) >> 11) % (uint64_t)(2 * self->every - 1));
}

/* record(v): single-writer (per-process histogram). */
static PyObject *hist_record(HistObject *self, PyObject *arg) {
    int64_t v;
    if (!MEM_LIVE(self->mem)) return NULL;
    if (get_i64(arg, &v) < 0) return NULL;
    VT(VP_HIST);
    hist_put(self->h, v);
    Py_RETURN_NONE;
}

/* record_since(t0_ns) -> now: records now - t0 and returns now (saves a clock call). */
static PyObject *hist_record_since(HistObject *self, PyObject *arg) {
    int64_t t0;
    if (!MEM_LIVE(self->mem)) return NULL;
    if (get_i64(arg, &t0) < 0) return NULL;
    VT(VP_HIST);
    VT_ADD(vt_price[VP_CLOCK]);
    int64_t t = clock_ns();
    hist_put(self->h, t - t0);
    return PyLong_FromLongLong(t);
}

/* start() -> the first sampling interval (operations to count down before the first sample) */
static PyObject *hist_start(HistObject *self, PyObject *unused) {
    self->cur = hist_interval(self);
    return PyLong_FromLongLong(self->cur);
}

/* sample(c0) -> next interval: c0 is a stats-clock reading (_prims.stats_clock(): the TSC, no
 * vDSO page to touch, which a sampled operation would often find cold); records the ns since then
 * for the cur operations of the interval that ends with this one (those settled already are in
 * the count), hands out the next interval. */
static PyObject *hist_sample(HistObject *self, PyObject *arg) {
    int64_t c0;
    VT(VP_HIST);
    int64_t c = cyc();
    if (!MEM_LIVE(self->mem)) return NULL;
    if (get_i64(arg, &c0) < 0) return NULL;
    int64_t w = self->cur > 0 ? self->cur : 1;
    hist_put_w(self->h, cyc_ns(c - c0), w);
    self->cur = hist_interval(self);
    return PyLong_FromLongLong(self->cur);
}

/* settle(left): the interval has `left` operations to go; the others ran unsampled: count them
 * (count only: buckets and sum hold the sampled values). */
static PyObject *hist_settle(HistObject *self, PyObject *arg) {
    int64_t left;
    if (!MEM_LIVE(self->mem)) return NULL;
    if (get_i64(arg, &left) < 0) return NULL;
    if (left < 1) left = 1;  /* the next operation is sampled: it stands for itself */
    if (self->cur > left) {
        STR(&self->h[0], LDR(&self->h[0]) + self->cur - left);
        self->cur = left;
    }
    Py_RETURN_NONE;
}

static PyObject *hist_every(HistObject *self, void *unused) { return PyLong_FromLongLong(self->every); }

static PyGetSetDef hist_getset[] = {
    {"every", (getter)hist_every, NULL, "mean sampling interval (1 = every operation timed)", NULL},
    {NULL}
};

static PyMethodDef hist_methods[] = {
    {"record", (PyCFunction)hist_record, METH_O, "record(value_ns)"},
    {"record_since", (PyCFunction)hist_record_since, METH_O, "record_since(t0_ns) -> now_ns"},
    {"start", (PyCFunction)hist_start, METH_NOARGS, "start() -> first sampling interval"},
    {"sample", (PyCFunction)hist_sample, METH_O,
     "sample(c0) -> next interval: record the ns since stats-clock reading c0, weighted by the interval it ends"},
    {"settle", (PyCFunction)hist_settle, METH_O,
     "settle(left): count the interval's operations that ran unsampled (left = still to go)"},
    {NULL}
};

static PyTypeObject HistType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ipc._prims.Histogram",
    .tp_basicsize = sizeof(HistObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Histogram(mem, index, every=1): log-linear latency histogram on shm words, "
              "every = mean sampling interval of sample()",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)hist_init,
    .tp_dealloc = (destructor)hist_dealloc,
    .tp_methods = hist_methods,
    .tp_getset = hist_getset,
};

/* ------------------------------------------------------------------ module functions */

static PyObject *m_now_ns(PyObject *mod, PyObject *unused) { VT(VP_CLOCK); return PyLong_FromLongLong(clock_ns()); }
static PyObject *m_cpu_relax(PyObject *mod, PyObject *unused) { VT(VP_RELAX); cpu_relax(); Py_RETURN_NONE; }
static PyObject *m_nop(PyObject *mod, PyObject *unused) { Py_RETURN_NONE; }
static PyObject *m_smp_mb(PyObject *mod, PyObject *unused) { VT(VP_FENCE); MB(); Py_RETURN_NONE; }

/* ---- the turnstile (ipc/vtime.py has the layout and the rules) ---- */
enum { VS_NOTYET, VS_READY, VS_RUN, VS_BLOCKED, VS_SLEEP, VS_DONE };
enum { VH_JOINED, VH_BLOCKED, VH_ABORT, VH_N, VH_HANDOFFS, VH_DEADLOCK };
enum { VS_CLOCK, VS_STATE, VS_GO, VS_KEY, VS_FROM, VS_PRIO, VS_PID, VS_HANDOFFS, VS_PARKED, VS_WORDS = 16 };
#define VT_SPIN_NS 50000LL  /* a process that gave up the turn polls for it this long before it sleeps */
enum { VT_OK = 0, VT_DEADLOCK = 1, VT_ABORTED = 2, VT_ORPHAN = 3, VT_SIGNAL = 4 /* exception set */ };
static int64_t *vt_hdr, *vt_slots, vt_n, vt_prio, vt_hkey;
static pid_t vt_parent;
static int vt_spin;          /* poll before sleeping: only when every process can have a CPU of its own */
static int64_t vt_quantum;  /* (ns * n) a scheduling point hands over only past the lowest other clock + this */
static int64_t vt_hlimit;   /* vt_hkey + vt_quantum, saturated */
#define VSLOT(i) (&vt_slots[(i) * VS_WORDS])
#define VKEY(i) (VSLOT(i)[VS_CLOCK] * vt_n + VSLOT(i)[VS_PRIO])

/* the runnable process with the lowest (clock, priority), -1 if none; `self` counts if asked */
static int64_t vt_best(int self) {
    int64_t best = -1, bk = INT64_MAX;
    for (int64_t i = 0; i < vt_n; i++) {
        int64_t st = VSLOT(i)[VS_STATE];
        if ((st != VS_READY && st != VS_SLEEP) || (i == vt_me && !self)) continue;
        int64_t k = VKEY(i);
        if (k < bk) { bk = k; best = i; }
    }
    return best;
}

static void vt_set_hkey(int64_t k) {
    vt_hkey = k;
    vt_hlimit = k > INT64_MAX - vt_quantum ? INT64_MAX : k + vt_quantum;
}

static void vt_horizon(void) {
    int64_t j = vt_best(0);
    vt_set_hkey(j < 0 ? INT64_MAX : VKEY(j));
}

/* the turn to j: its go word, and a futex wake only if it went to sleep (a polling process sees the
 * word; the seq_cst pair go-store / parked-load here, parked-store / go-load there, lets one miss
 * the other, never both) */
static void vt_go(int64_t j) {
    int64_t *s = VSLOT(j);
    s[VS_STATE] = VS_RUN;
    __atomic_store_n(&s[VS_GO], 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&s[VS_PARKED], __ATOMIC_SEQ_CST)) futex_wake32((int32_t *)&s[VS_GO], 1);
}


/* park until this process is given the turn; VT_*.  It polls the go word for VT_SPIN_NS first if
 * `spin` (every process has a CPU, or it is next in line), and again after each futex wake that
 * did not give it the turn (the runner woke it to poll: it is next in line now) */
static int vt_wait_turn_(int spin) {
    int64_t *s = VSLOT(vt_me);
    for (;;) {
        if (spin) {
            int64_t end = now_ns() + VT_SPIN_NS;
            int n = 0;
            while (!__atomic_load_n(&s[VS_GO], __ATOMIC_ACQUIRE)) {
                cpu_relax();
                if (!(++n & 63) && (now_ns() > end || __atomic_load_n(&vt_hdr[VH_ABORT], __ATOMIC_RELAXED))) break;
            }
        }
        __atomic_store_n(&s[VS_PARKED], 1, __ATOMIC_SEQ_CST);
        if (__atomic_load_n(&s[VS_GO], __ATOMIC_SEQ_CST) || __atomic_load_n(&vt_hdr[VH_ABORT], __ATOMIC_SEQ_CST)) {
            __atomic_store_n(&s[VS_PARKED], 0, __ATOMIC_RELAXED);
            break;
        }
        long r;
        int err;
        Py_BEGIN_ALLOW_THREADS
        r = futex_wait32((int32_t *)&s[VS_GO], 0, 200000000LL);
        err = errno;
        Py_END_ALLOW_THREADS
        __atomic_store_n(&s[VS_PARKED], 0, __ATOMIC_RELAXED);
        if (r == -1 && err == ETIMEDOUT && getppid() != vt_parent) return VT_ORPHAN;
        if (r == -1 && err == EINTR && PyErr_CheckSignals() < 0) return VT_SIGNAL;  /* SIGTERM, ^C */
        if (__atomic_load_n(&s[VS_GO], __ATOMIC_SEQ_CST) || __atomic_load_n(&vt_hdr[VH_ABORT], __ATOMIC_SEQ_CST)) break;
        spin = r == 0;  /* woken without the turn: next in line */
    }
    s[VS_GO] = 0;
    if (__atomic_load_n(&vt_hdr[VH_ABORT], __ATOMIC_SEQ_CST)) return VT_ABORTED;
    s[VS_STATE] = VS_RUN;
    vt_horizon();
    return VT_OK;
}

/* vt_wait_turn_ with vt_attach / vt_detach refused meanwhile (they would move vt_hdr / vt_slots
 * under it: a signal handler run from it, or another thread while it is parked with the GIL
 * released), and the turnstile's Mem kept exported (a release() meanwhile keeps the mapping until
 * it returns, as around every blocking call on a Mem) */
static int vt_wait_turn(int spin) {
    MemObject *m = (MemObject *)vt_owner;
    unsigned gen = vt_fork_gen;
    vt_waiting++;
    if (m) mem_block_begin(m);
    int r = vt_wait_turn_(spin);
    if (gen == vt_fork_gen) {  /* (a child forked from a signal handler meanwhile dropped both counts) */
        if (m) mem_block_end(m);
        vt_waiting--;
    }
    return r;
}

/* The attached clock's Mem stays exported from vt_attach until the clock is detached (vt_detach,
 * vt_done, or the detach in vt_result): vt_hdr / vt_slots / vt_clk / vt_lines are written through
 * after a park and on every priced access, so a Mem.release() meanwhile (Region.close from another
 * thread, or a signal handler) only marks it unusable and the mapping lives until the clock lets go.
 * Ends the pin once per attach; the caller touches none of those words afterwards (the release of
 * the buffer may run Python code: the pending exception, if any, is kept). */
static void vt_unpin(void) {
    if (!vt_pinned) return;
    vt_pinned = 0;
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    mem_block_end((MemObject *)vt_owner);
    PyErr_Restore(et, ev, tb);
}

/* give up the turn in `state` unless this process is still the lowest (never, when BLOCKED).  The
 * process next in line after the new runner polls for the turn meanwhile (this one, or another
 * woken to do so), so that most hand-offs find their taker awake */
static int vt_yield(int64_t state) {
    int64_t j = vt_best(0);
    if (j < 0 || (state != VS_BLOCKED && VKEY(j) > VKEY(vt_me))) {
        if (state == VS_BLOCKED) {
            vt_hdr[VH_BLOCKED]--;
            return VT_DEADLOCK;
        }
        vt_set_hkey(j < 0 ? INT64_MAX : VKEY(j));
        return VT_OK;
    }
    int64_t *s = VSLOT(vt_me);
    s[VS_STATE] = state;
    s[VS_HANDOFFS]++;
    vt_hdr[VH_HANDOFFS]++;
    int spin = vt_spin;
    if (!spin) {
        VSLOT(j)[VS_STATE] = VS_RUN;  /* (vt_go sets it too) out of the next-in-line search */
        int64_t k = vt_best(1);
        if (k == vt_me) spin = 1;
    }
    vt_go(j);
    return vt_wait_turn(spin);
}

#define VT_ATTACHED() if (!vt_clk) { PyErr_SetString(PyExc_RuntimeError, "no virtual clock attached"); return NULL; }

static PyObject *vt_exc_aborted, *vt_exc_deadlock;  /* ipc/vtime.py's classes (vt_exceptions) */

static void vt_abort_all(int64_t *h, int64_t *sl, int64_t n) {
    __atomic_store_n(&h[VH_ABORT], 1, __ATOMIC_SEQ_CST);
    for (int64_t i = 0; i < n; i++) {
        __atomic_store_n(&sl[i * VS_WORDS + VS_GO], 1, __ATOMIC_SEQ_CST);
        futex_wake32((int32_t *)&sl[i * VS_WORDS + VS_GO], INT_MAX);
    }
}

/* a VT_* code as the caller sees it: None, or the exception (detached then) */
static PyObject *vt_result(int code, const char *what) {
    if (code == VT_OK) Py_RETURN_NONE;
    int64_t *h = vt_hdr, *sl = vt_slots, me = vt_me;
    vt_on = 0;
    vt_clk = NULL;
    if (code == VT_SIGNAL) {  /* leaving on a signal while parked: the others must not wait for it */
        vt_abort_all(h, sl, vt_n);
        vt_unpin();
        return NULL;
    }
    PyObject *exc = code == VT_DEADLOCK ? vt_exc_deadlock : vt_exc_aborted;
    if (!exc) exc = PyExc_RuntimeError;
    if (code == VT_DEADLOCK) {
        h[VH_DEADLOCK] = me + 1;
        vt_abort_all(h, sl, vt_n);
        PyErr_Format(exc, "virtual time: deadlock: vCPU %lld %s and every other unfinished vCPU is blocked",
                     (long long)me, what);
    } else if (code == VT_ORPHAN) {
        PyErr_SetString(exc, "the coordinator is gone");
    } else if (h[VH_DEADLOCK]) {
        PyErr_Format(exc, "virtual-time run ended (deadlock found by vCPU %lld)", (long long)(h[VH_DEADLOCK] - 1));
    } else {
        PyErr_SetString(exc, "virtual-time run ended");
    }
    vt_unpin();  /* detached: h / sl are not touched any more */
    return NULL;
}

static PyObject *m_vt_exceptions(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    CHECK_NARGS(2, "vt_exceptions");
    Py_INCREF(args[0]);
    Py_XSETREF(vt_exc_aborted, args[0]);
    Py_INCREF(args[1]);
    Py_XSETREF(vt_exc_deadlock, args[1]);
    Py_RETURN_NONE;
}

/* vt_attach(mem, hdr_index, slots_index, nlines_index, nlines, me, prices): this process' clock is
 * slot `me` of the turnstile at hdr_index / slots_index (n = hdr[3] slots); prices: VP_N ints
 * (ns, in the order of ipc/vtime.C_PRICES); nlines a power of two.  Charging starts now. */
static PyObject *m_vt_attach(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    CHECK_NARGS(7, "vt_attach");
    if (!PyObject_TypeCheck(args[0], &MemType)) { PyErr_SetString(PyExc_TypeError, "vt_attach: need Mem"); return NULL; }
    MemObject *m = (MemObject *)args[0];
    int64_t hi, si, li, nl, me;
    if (get_i64(args[1], &hi) < 0 || get_i64(args[2], &si) < 0 || get_i64(args[3], &li) < 0 ||
        get_i64(args[4], &nl) < 0 || get_i64(args[5], &me) < 0)
        return NULL;
    if (nl <= 0 || nl > (1LL << 30) || (nl & (nl - 1))) {
        PyErr_SetString(PyExc_ValueError, "vt_attach: nlines must be a power of two <= 2**30");
        return NULL;
    }
    PyObject *pr = PySequence_Fast(args[6], "vt_attach: prices must be a sequence");
    if (!pr) return NULL;
    if (PySequence_Fast_GET_SIZE(pr) != VP_N) {
        Py_DECREF(pr);
        PyErr_Format(PyExc_ValueError, "vt_attach: %d prices expected", VP_N);
        return NULL;
    }
    int64_t prices[VP_N];
    for (int i = 0; i < VP_N; i++)
        if (get_i64(PySequence_Fast_GET_ITEM(pr, i), &prices[i]) < 0 || prices[i] < 0) {
            Py_DECREF(pr);
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "vt_attach: prices must be >= 0");
            return NULL;
        }
    Py_DECREF(pr);
    if (vt_waiting) {
        PyErr_SetString(PyExc_RuntimeError, "vt_attach: this process waits for its turn (vt_* call in progress)");
        return NULL;
    }
    int64_t *h = mem_word_at(m, hi, 8, "vt_attach header");
    if (!h) return NULL;
    int64_t n = h[VH_N];
    if (n < 1 || n >= 0x7fff || me < 0 || me >= n) { PyErr_SetString(PyExc_ValueError, "vt_attach: bad process count or index"); return NULL; }
    Py_ssize_t sspan = words_span(n, VS_WORDS, "vt_attach slots"), lspan = words_span(nl, 2, "vt_attach lines");
    if (sspan < 0 || lspan < 0) return NULL;
    int64_t *sl = mem_word_at(m, si, sspan, "vt_attach slots");
    int64_t *l = sl ? mem_word_at(m, li, lspan, "vt_attach lines") : NULL;
    if (!l) return NULL;
    memcpy(vt_price, prices, sizeof prices);
    mem_block_begin(m);  /* pinned while attached (vt_unpin) */
    vt_unpin();          /* a clock attached before (no vt_detach): its pin ends */
    vt_pinned = 1;
    Py_INCREF(m);
    Py_XSETREF(vt_owner, (PyObject *)m);
    vt_hdr = h;
    vt_slots = sl;
    vt_n = n;
    vt_me = me;
    vt_prio = sl[me * VS_WORDS + VS_PRIO];
    vt_parent = getppid();
    vt_spin = n <= sysconf(_SC_NPROCESSORS_ONLN);
    vt_quantum = vt_price[VP_QUANTUM] * n;
    vt_set_hkey(INT64_MAX);
    vt_clk = &sl[me * VS_WORDS + VS_CLOCK];
    vt_lines = l;
    vt_line_mask = nl - 1;
    vt_transfers = 0;
    memset(vt_seen_tag, 0, sizeof vt_seen_tag);
    vt_on = 1;
    Py_RETURN_NONE;
}

/* vt_join(): ready at clock 0; the last to join starts the lowest */
static PyObject *m_vt_join(PyObject *mod, PyObject *unused) {
    VT_ATTACHED();
    VSLOT(vt_me)[VS_STATE] = VS_READY;
    if (__atomic_add_fetch(&vt_hdr[VH_JOINED], 1, __ATOMIC_SEQ_CST) == vt_n) {
        int64_t j = vt_best(1);
        if (j != vt_me) {
            vt_go(j);
            return vt_result(vt_wait_turn(vt_spin), "joined");
        }
        VSLOT(vt_me)[VS_STATE] = VS_RUN;
        vt_horizon();
        Py_RETURN_NONE;
    }
    return vt_result(vt_wait_turn(vt_spin), "joined");
}

/* vt_hit(name): a scheduling point (name: what it is, unused): hand the turn over if another
 * runnable clock is lower; a no-op when no clock is attached */
static PyObject *m_vt_hit(PyObject *mod, PyObject *unused) {
    if (!vt_clk) Py_RETURN_NONE;
    if (__builtin_expect(__atomic_load_n(&vt_hdr[VH_ABORT], __ATOMIC_RELAXED), 0)) return vt_result(VT_ABORTED, "");
    if (*vt_clk * vt_n + vt_prio <= vt_hlimit) Py_RETURN_NONE;
    return vt_result(vt_yield(VS_READY), "yielded");
}

/* vt_spin(price): one poll of a spin-wait loop: price ns, then a scheduling point; a poll with no
 * other runnable process waits for what nobody can change any more: a deadlock */
static PyObject *m_vt_spin(PyObject *mod, PyObject *arg) {
    int64_t ns;
    if (get_i64(arg, &ns) < 0) return NULL;
    VT_ATTACHED();
    if (__atomic_load_n(&vt_hdr[VH_ABORT], __ATOMIC_RELAXED)) return vt_result(VT_ABORTED, "");
    if (ns > 0) *vt_clk += ns;
    if (vt_best(0) < 0) return vt_result(VT_DEADLOCK, "spins on what no runnable vCPU can change");
    if (*vt_clk * vt_n + vt_prio <= vt_hlimit) Py_RETURN_NONE;
    return vt_result(vt_yield(VS_READY), "spun");
}

/* vt_block(key) -> VT_*: wait until vt_released(key) by another process */
static PyObject *m_vt_block(PyObject *mod, PyObject *arg) {
    VT_ATTACHED();
    int64_t key;
    if (get_i64(arg, &key) < 0) return NULL;
    VSLOT(vt_me)[VS_KEY] = key;
    vt_hdr[VH_BLOCKED]++;
    return vt_result(vt_yield(VS_BLOCKED), "waits for a release");
}

/* vt_released(key, price): the waiters on key run again at max(own clock, this clock + price) */
static PyObject *m_vt_released(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    CHECK_NARGS(2, "vt_released");
    int64_t key, price;
    if (get_i64(args[0], &key) < 0 || get_i64(args[1], &price) < 0) return NULL;
    if (!vt_clk || !vt_hdr[VH_BLOCKED]) Py_RETURN_NONE;
    int64_t t = *vt_clk + price, woke = 0;
    for (int64_t i = 0; i < vt_n; i++) {
        int64_t *s = VSLOT(i);
        if (s[VS_STATE] != VS_BLOCKED || s[VS_KEY] != key) continue;
        if (s[VS_CLOCK] < t) s[VS_CLOCK] = t;
        s[VS_STATE] = VS_READY;
        woke++;
    }
    if (woke) {
        vt_hdr[VH_BLOCKED] -= woke;
        vt_horizon();
    }
    Py_RETURN_NONE;
}

/* vt_sleep(ns, kickable): ns of guest time (or a modelled delay); a kick may end it early when
 * kickable (L2 run time: vt_kick) */
static PyObject *m_vt_sleep(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    CHECK_NARGS(2, "vt_sleep");
    VT_ATTACHED();
    int64_t ns, kick;
    if (get_i64(args[0], &ns) < 0 || get_i64(args[1], &kick) < 0) return NULL;
    if (ns <= 0) Py_RETURN_NONE;
    int64_t *s = VSLOT(vt_me);
    s[VS_FROM] = kick ? *vt_clk : -1;
    *vt_clk += ns;
    if (*vt_clk * vt_n + vt_prio <= vt_hlimit) Py_RETURN_NONE;
    return vt_result(vt_yield(VS_SLEEP), "slept");
}

/* vt_kick(target, price): target's guest time ends at max(its start, this clock + price) */
static PyObject *m_vt_kick(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    CHECK_NARGS(2, "vt_kick");
    int64_t t, price;
    if (get_i64(args[0], &t) < 0 || get_i64(args[1], &price) < 0) return NULL;
    if (!vt_clk || t < 0 || t >= vt_n || t == vt_me) Py_RETURN_FALSE;
    int64_t *s = VSLOT(t);
    if (s[VS_STATE] != VS_SLEEP || s[VS_FROM] < 0) Py_RETURN_FALSE;  /* not in a kickable sleep */
    int64_t c = *vt_clk + price;
    if (c < s[VS_FROM]) c = s[VS_FROM];
    if (c >= s[VS_CLOCK]) Py_RETURN_FALSE;
    s[VS_CLOCK] = c;
    vt_horizon();
    Py_RETURN_TRUE;
}

/* vt_done() -> VT_*: this process has finished: the turn goes on for good; detached */
static PyObject *m_vt_done(PyObject *mod, PyObject *unused) {
    VT_ATTACHED();
    VSLOT(vt_me)[VS_STATE] = VS_DONE;
    int64_t j = vt_best(0), blocked = vt_hdr[VH_BLOCKED];
    if (j >= 0) vt_go(j);
    if (j < 0 && blocked) return vt_result(VT_DEADLOCK, "finished");
    vt_on = 0;
    vt_clk = NULL;
    vt_unpin();
    Py_RETURN_NONE;
}

/* vt_abort(mem, hdr_index, slots_index): every parked process wakes and sees the abort */
static PyObject *m_vt_abort(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    CHECK_NARGS(3, "vt_abort");
    if (!PyObject_TypeCheck(args[0], &MemType)) { PyErr_SetString(PyExc_TypeError, "vt_abort: need Mem"); return NULL; }
    MemObject *m = (MemObject *)args[0];
    int64_t hi, si;
    if (get_i64(args[1], &hi) < 0 || get_i64(args[2], &si) < 0) return NULL;
    int64_t *h = mem_word_at(m, hi, 8, "vt_abort header");
    if (!h) return NULL;
    int64_t n = h[VH_N];
    if (n < 1 || n >= 0x7fff) { PyErr_SetString(PyExc_ValueError, "vt_abort: bad process count"); return NULL; }
    Py_ssize_t sspan = words_span(n, VS_WORDS, "vt_abort slots");
    if (sspan < 0) return NULL;
    int64_t *sl = mem_word_at(m, si, sspan, "vt_abort slots");
    if (!sl) return NULL;
    vt_abort_all(h, sl, n);
    Py_RETURN_NONE;
}

static PyObject *m_vt_detach(PyObject *mod, PyObject *unused) {
    if (vt_waiting) {
        PyErr_SetString(PyExc_RuntimeError, "vt_detach: this process waits for its turn (vt_* call in progress)");
        return NULL;
    }
    vt_on = 0;
    vt_clk = NULL;
    vt_hdr = vt_slots = NULL;
    vt_lines = NULL;
    vt_unpin();
    Py_CLEAR(vt_owner);
    Py_RETURN_NONE;
}

/* vt_enable(on) -> was on: pause / resume charging (telemetry between ticks is not the model's) */
static PyObject *m_vt_enable(PyObject *mod, PyObject *arg) {
    int was = vt_on, on = PyObject_IsTrue(arg);
    if (on < 0) return NULL;
    vt_on = on && vt_clk != NULL;
    return PyBool_FromLong(was);
}

/* vt_advance(ns) -> the clock after adding ns (guest time, modelled waits); no charge */
static PyObject *m_vt_advance(PyObject *mod, PyObject *arg) {
    int64_t ns;
    if (get_i64(arg, &ns) < 0) return NULL;
    if (!vt_clk) { PyErr_SetString(PyExc_RuntimeError, "vt_advance: no virtual clock attached"); return NULL; }
    if (ns > 0) *vt_clk += ns;
    return PyLong_FromLongLong(*vt_clk);
}

/* vt_now() -> this process' virtual clock, or None when none is attached (no price) */
static PyObject *m_vt_now(PyObject *mod, PyObject *unused) {
    if (!vt_clk) Py_RETURN_NONE;
    return PyLong_FromLongLong(*vt_clk);
}

static PyObject *m_vt_transfers(PyObject *mod, PyObject *unused) { return PyLong_FromLongLong(vt_transfers); }

static PyObject *m_vt_seed(PyObject *mod, PyObject *arg) {
    int64_t v;
    if (get_i64(arg, &v) < 0) return NULL;
    vt_hist_seed = (uint64_t)v;
    Py_RETURN_NONE;
}

static PyObject *m_sched_yield(PyObject *mod, PyObject *unused) {
    Py_BEGIN_ALLOW_THREADS
    sched_yield();
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* spin_ns(ns): busy-wait for ns (guest run time), checking signals every ms. */
static PyObject *m_spin_ns(PyObject *mod, PyObject *arg) {
    int64_t ns;
    if (get_i64(arg, &ns) < 0) return NULL;
    int64_t end = now_ns() + ns, next_check = now_ns() + 1000000;
    for (;;) {
        int64_t t = now_ns();
        if (t >= end) break;
        if (t >= next_check) {
            if (PyErr_CheckSignals() < 0) return NULL;
            next_check = t + 1000000;
        }
        cpu_relax();
    }
    Py_RETURN_NONE;
}

static PyObject *m_hist_bucket(PyObject *mod, PyObject *arg) {
    int64_t v;
    if (get_i64(arg, &v) < 0) return NULL;
    return PyLong_FromLong(hist_bucket(v));
}

static PyObject *m_clock_source(PyObject *mod, PyObject *unused) { return PyUnicode_FromString(clk_name()); }
static PyObject *m_stats_clock(PyObject *mod, PyObject *unused) { VT(VP_CLOCK); return PyLong_FromLongLong(cyc()); }

static PyObject *m_stats_clock_ns(PyObject *mod, PyObject *arg) {
    int64_t d;
    if (get_i64(arg, &d) < 0) return NULL;
    return PyLong_FromLongLong(cyc_ns(d));
}

static PyObject *m_stats_clock_abs_ns(PyObject *mod, PyObject *arg) {
    int64_t c;
    if (get_i64(arg, &c) < 0) return NULL;
    return PyLong_FromLongLong(cyc_abs_ns(c));
}

/* self_identity() -> (pid, start time) this process records as a lock holder */
static PyObject *m_self_identity(PyObject *mod, PyObject *unused) {
    return Py_BuildValue("(LL)", (long long)HI32(g_pid_hi), (long long)my_start());
}

static PyMethodDef module_methods[] = {
    {"self_identity", m_self_identity, METH_NOARGS,
     "(pid, start time) this process records as a lock holder (start time: /proc/self/stat field 22)"},
    {"clock_source", m_clock_source, METH_NOARGS, "stats clock: 'tsc', 'cntvct' or 'monotonic'"},
    {"stats_clock", m_stats_clock, METH_NOARGS, "raw stats-clock reading (cycles, or ns on 'monotonic')"},
    {"stats_clock_ns", m_stats_clock_ns, METH_O, "stats_clock_ns(delta) -> ns of a stats-clock delta"},
    {"stats_clock_abs_ns", m_stats_clock_abs_ns, METH_O,
     "stats_clock_abs_ns(reading) -> CLOCK_MONOTONIC ns of a stats-clock reading (as in acq_ns)"},
    {"now_ns", m_now_ns, METH_NOARGS, "CLOCK_MONOTONIC in ns"},
    {"cpu_relax", m_cpu_relax, METH_NOARGS, "pause / yield instruction"},
    {"sched_yield", m_sched_yield, METH_NOARGS, "sched_yield(2)"},
    {"smp_mb", m_smp_mb, METH_NOARGS, "full memory barrier"},
    {"nop", m_nop, METH_NOARGS, "no-op (benchmark floor)"},
    {"spin_ns", m_spin_ns, METH_O, "busy-wait for ns"},
    {"vt_attach", (PyCFunction)(void (*)(void))m_vt_attach, METH_FASTCALL,
     "vt_attach(mem, hdr_index, slots_index, lines_index, nlines, me, prices): virtual time for this process"},
    {"vt_join", m_vt_join, METH_NOARGS, "vt_join(): start this clock, wait for the others (ipc/vtime.py)"},
    {"vt_hit", m_vt_hit, METH_O, "vt_hit(name): scheduling point (hand over if another clock is lower)"},
    {"vt_exceptions", (PyCFunction)(void (*)(void))m_vt_exceptions, METH_FASTCALL,
     "vt_exceptions(aborted, deadlock): the classes the vt_* calls raise"},
    {"vt_block", m_vt_block, METH_O, "vt_block(key): wait for vt_released(key)"},
    {"vt_released", (PyCFunction)(void (*)(void))m_vt_released, METH_FASTCALL,
     "vt_released(key, price): wake the waiters on key at this clock + price"},
    {"vt_sleep", (PyCFunction)(void (*)(void))m_vt_sleep, METH_FASTCALL,
     "vt_sleep(ns, kickable): guest time (kickable: a vt_kick may end it)"},
    {"vt_spin", m_vt_spin, METH_O, "vt_spin(ns): one priced poll of a spin-wait loop (a deadlock if nobody else can run)"},
    {"vt_kick", (PyCFunction)(void (*)(void))m_vt_kick, METH_FASTCALL,
     "vt_kick(target, price) -> bool: end target's guest time at this clock + price"},
    {"vt_done", m_vt_done, METH_NOARGS, "vt_done(): finished; hand the turn on, detach"},
    {"vt_abort", (PyCFunction)(void (*)(void))m_vt_abort, METH_FASTCALL,
     "vt_abort(mem, hdr_index, slots_index): end a virtual-time run for every process"},
    {"vt_detach", m_vt_detach, METH_NOARGS, "back to real time"},
    {"vt_enable", m_vt_enable, METH_O, "vt_enable(on) -> was on: pause / resume the pricing"},
    {"vt_advance", m_vt_advance, METH_O, "vt_advance(ns) -> clock: add ns (guest time) without a price"},
    {"vt_now", m_vt_now, METH_NOARGS, "vt_now() -> this process' virtual clock (ns), None if not attached"},
    {"vt_transfers", m_vt_transfers, METH_NOARGS, "cache-line transfers this process paid"},
    {"vt_seed", m_vt_seed, METH_O, "vt_seed(s): histograms made from now on sample with a phase from s (0: the host's)"},
    {"hist_bucket", m_hist_bucket, METH_O, "bucket index of a value"},
    {"set_preempt_hook", m_set_preempt_hook, METH_O,
     "set_preempt_hook(hook or None) -> previous: call hook(name) at the named preemption points "
     "inside the primitives (ipc/fuzz.py); None = off"},
    {"preempt_points", m_preempt_points, METH_NOARGS, "names of the preemption points inside the primitives"},
    {"rcu_wait_readers", (PyCFunction)(void (*)(void))rcu_wait_readers, METH_FASTCALL,
     "rcu_wait_readers(mem, header_index, slot0_index, nslots, timeout_ns) -> -1 or blocking slot"},
    {NULL}
};

static struct PyModuleDef prims_module = {
    PyModuleDef_HEAD_INIT, "ipc._prims", "compiled shared-memory concurrency primitives", -1, module_methods
};

static int trace_module_init(PyObject *m); /* the trace section at the end of this file */

PyMODINIT_FUNC PyInit__prims(void) {
    clk_init();
    after_fork_child();
    static int atfork_done;
    if (!atfork_done && pthread_atfork(NULL, NULL, after_fork_child) == 0) atfork_done = 1;
    PyTypeObject *types[] = {&MemType, &SpinLockType, &MutexType, &RwLockType, &ReaderType, &HistType};
    for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++)
        if (PyType_Ready(types[i]) < 0) return NULL;
    PyObject *m = PyModule_Create(&prims_module);
    if (!m) return NULL;
    const char *names[] = {"Mem", "SpinLock", "Mutex", "RwLock", "RcuReader", "Histogram"};
    for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++) {
        Py_INCREF(types[i]);
        if (PyModule_AddObject(m, names[i], (PyObject *)types[i]) < 0) return NULL;
    }
    LockHolderDiedError = PyErr_NewExceptionWithDoc(
        "ipc._prims.LockHolderDied",
        "lock(): the process recorded as the lock's holder is dead (or its pid was reused by another "
        "process).  Attributes: holder_pid, holder_start, owner_tag, lock_word, lock_name, pid_reused.",
        PyExc_RuntimeError, NULL);
    if (!LockHolderDiedError) return NULL;
    Py_INCREF(LockHolderDiedError);
    if (PyModule_AddObject(m, "LockHolderDied", LockHolderDiedError) < 0) return NULL;
    PyModule_AddIntConstant(m, "LOCK_WORDS", LOCK_WORDS);
    PyModule_AddIntConstant(m, "STAT_WORDS", STAT_WORDS);
    PyModule_AddIntConstant(m, "HIST_SUB_BITS", HIST_SUB_BITS);
    PyModule_AddIntConstant(m, "HIST_BUCKETS", HIST_BUCKETS);
    PyModule_AddIntConstant(m, "HIST_HDR", HIST_HDR);
    PyModule_AddIntConstant(m, "HIST_WORDS", HIST_WORDS);
    PyModule_AddObject(m, "GP_CTR_PHASE", PyLong_FromLongLong(GP_CTR_PHASE));
    PyModule_AddObject(m, "GP_COUNT", PyLong_FromLongLong(GP_COUNT));
    for (int i = 0; i < PP_N; i++)
        if (!pp_str[i] && !(pp_str[i] = PyUnicode_InternFromString(pp_names[i]))) return NULL;
    if (trace_module_init(m) < 0) return NULL;
    return m;
}

/* ================================================================== trace ring (ipc/trace.py)
 * One event ring per process in shared memory; this process writes only its own (attached with
 * trace_attach).  Declared once in ipc/trace.py (fields()); word layout:
 *   ring header (8 words, one line per process)
 *     [0] head      events ever written (the next sequence number); release-stored after the event
 *     [1] pid       of the writer (trace_attach)
 *     [2] nevents   ring capacity
 *   ring events (nevents x TR_EV_WORDS words)
 *     [0] ts        the raw stats clock, cyc() (ipc/trace.py converts every ring with one
 *                   calibration, trace_clock(): cross-process order is the clock's own)
 *     [1] code      (category << 40) | (phase << 32) | name id (interned in the ring's name table)
 *     [2] a, [3] b  arguments
 * Event sequence s lives at slot s % nevents; the oldest is overwritten.
 *
 * Traced lock / RCU reader types (TracedSpinLock, TracedMutex, TracedRwLock, TracedRcuReader) are subtypes of
 * the plain ones: ipc/locks.py and ipc/rcu.py choose them at object creation when tracing is on,
 * so the plain types' paths stay untouched when it is off (their slow paths test one flag).  Their
 * events: lock wait begin (stamped with the slow path's own t0) / wait end, hold begin (acquired,
 * a = waited, 2 = recover()ed from a dead holder) / hold end (by the holder only, before the
 * release store, so a waiter's acquisition is always later); RCU read section begin / end at
 * the outermost lock / unlock only; TracedRwLock's read side: the same wait and hold events with
 * argument b = 1 (outermost read section only).  ``trace_id`` names the object (a name id); it defaults to its word index. */

#include "structmember.h"

#define TR_EV_WORDS 4
enum { TR_PH_B = 1, TR_PH_E = 2, TR_PH_I = 3 };
enum { TR_CAT_OP = 0, TR_CAT_WAIT = 1, TR_CAT_HOLD = 2, TR_CAT_RCU = 3 };
#define TR_CODE(cat, ph, id) (((int64_t)(cat) << 40) | ((int64_t)(ph) << 32) | ((int64_t)(id) & 0xffffffffLL))

static MemObject *tr_mem;       /* the attached ring's Mem (a reference), NULL = tracing off */
static int64_t *tr_hdr, *tr_ev;
static uint64_t tr_n, tr_head;  /* capacity; head kept here (the shm copy is only published) */

/* one event stamped with the stats-clock reading c (raw: ipc/trace.py converts every ring with
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

/* trace_attach(mem, header_index, events_index, nevents): this process' ring (None detaches) */
static PyObject *m_trace_attach(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
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
static PyObject *m_trace_clock(PyObject *mod, PyObject *unused) {
    if (clk_kind != CLK_CYC) return Py_BuildValue("(iLLK)", 0, 0LL, 0LL, (unsigned long long)1 << 32);
    cyc_abs_slow(cyc());
    return Py_BuildValue("(iLLK)", 1, (long long)clk_anchor_cyc, (long long)clk_anchor_ns,
                         (unsigned long long)clk_mult);
}

/* trace_emit(code, a=0, b=0): one event into this process' ring (nothing when none is attached) */
static PyObject *m_trace_emit(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
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
static void tr_wait_begin(LockObject *self, int64_t t0) {
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
    static PyTypeObject t##P##_type = {                                                           \
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

static PyTypeObject TracedRcuReaderType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "ipc._prims.TracedRcuReader",
    .tp_basicsize = sizeof(TReaderObject), .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "RcuReader whose outermost read-side sections are events in this process' trace ring",
    .tp_init = (initproc)treader_init, .tp_methods = treader_methods, .tp_members = treader_members};

static PyMethodDef trace_functions[] = {
    {"trace_attach", (PyCFunction)(void (*)(void))m_trace_attach, METH_FASTCALL,
     "trace_attach(mem, header_index, events_index, nevents) or trace_attach(None): this process' ring"},
    {"trace_clock", (PyCFunction)m_trace_clock, METH_NOARGS,
     "trace_clock() -> (cycles?, anchor cycles, anchor ns, ns per cycle * 2**32): raw stamps -> ns"},
    {"trace_emit", (PyCFunction)(void (*)(void))m_trace_emit, METH_FASTCALL,
     "trace_emit(code, a=0, b=0): one event into this process' ring (no-op when none is attached)"},
    {NULL}
};

static int trace_module_init(PyObject *m) {
    tspin_type.tp_base = &SpinLockType;
    tmutex_type.tp_base = &MutexType;
    trw_type.tp_base = &RwLockType;
    TracedRcuReaderType.tp_base = &ReaderType;
    PyTypeObject *types[] = {&tspin_type, &tmutex_type, &trw_type, &TracedRcuReaderType};
    const char *names[] = {"TracedSpinLock", "TracedMutex", "TracedRwLock", "TracedRcuReader"};
    for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++) {
        if (PyType_Ready(types[i]) < 0) return -1;
        Py_INCREF(types[i]);
        if (PyModule_AddObject(m, names[i], (PyObject *)types[i]) < 0) return -1;
    }
    if (PyModule_AddFunctions(m, trace_functions) < 0) return -1;
    static const struct { const char *name; int value; } consts[] = {
        {"TR_EV_WORDS", TR_EV_WORDS}, {"TR_PH_B", TR_PH_B}, {"TR_PH_E", TR_PH_E}, {"TR_PH_I", TR_PH_I},
        {"TR_CAT_OP", TR_CAT_OP}, {"TR_CAT_WAIT", TR_CAT_WAIT}, {"TR_CAT_HOLD", TR_CAT_HOLD},
        {"TR_CAT_RCU", TR_CAT_RCU}};
    for (size_t i = 0; i < sizeof(consts) / sizeof(consts[0]); i++)
        if (PyModule_AddIntConstant(m, consts[i].name, consts[i].value) < 0) return -1;
    return 0;
}
