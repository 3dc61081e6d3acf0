/*
 * ipc/prims/vtime.c -- virtual time (ipc/vtime.py): the priced clock, the line table, the turnstile.
 *
 * Under `--clock virtual` a vCPU process attaches its clock word (vt_attach): from then on every
 * priced call into this module adds its price (ns) to that word, the stats clock and now_ns()
 * read it, and a touch of a 64-byte line whose last writer was another process adds the line
 * transfer price.  Only one process runs at a time then (ipc/vtime.py hands the turn over), so
 * the shared line table is read and written with plain accesses.  Detached: one branch per call.
 *
 * The pricing itself (VT, VT_ADD, VT_MEM, vt_mem) is inline in prims.h, in every priced call; this
 * file holds the state behind it, the cache-line transfer model (vt_line) and the turnstile that
 * hands the one running turn between the processes in the order of their clocks (vt_* functions).
 */
#include "prims.h"

int64_t *vt_clk;                 /* this process' clock word; NULL = real time */
int vt_on;                       /* charging (vt_enable): off while telemetry runs */
int64_t vt_price[VP_N];
static int64_t *vt_lines;        /* shared line table: (tag, writer | version << 16 | shared << 15) pairs */
static int64_t vt_line_mask;     /* entries - 1 (a power of two) */
static int64_t vt_me;            /* this process' index (< 32768) */
static PyObject *vt_owner;       /* the Mem holding vt_clk / vt_lines (a reference) */
static int vt_pinned;            /* vt_owner's busy count holds one for the attached clock (vt_unpin) */
static int vt_waiting;           /* vt_wait_turn calls in progress (parked, or a signal handler run from one) */
static unsigned vt_fork_gen;     /* bumped in every fork()ed child: a wait begun before the fork is not ours */
static int64_t vt_transfers;     /* line transfers this process paid (for the results) */
uint64_t vt_hist_seed;           /* nonzero: histograms made from now on take their phase from it */
#define VT_SEEN 4096
static int64_t vt_seen_tag[VT_SEEN], vt_seen_ver[VT_SEEN];  /* lines this process holds a copy of */

/* a touch of line `line` of the segment with key `key`: the transfer price if another process
 * wrote it last and this one holds no copy of that version (reads), or holds no exclusive copy
 * (writes: another process wrote or read it since this one's last write) */
void vt_line(int64_t key, int64_t line, int write) {
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

/* the threads parked in vt_wait_turn are not in a fork()ed child: their counts go (the Mem's busy
 * count keeps the clock's pin, so nothing is released here; module.c: after_fork_child) */
void vt_after_fork(void) {
    if (vt_waiting && vt_owner) ((MemObject *)vt_owner)->busy -= vt_waiting;
    vt_waiting = 0;
    vt_fork_gen++;
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

/* ------------------------------------------------------------------ module functions */

PyObject *m_vt_exceptions(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
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
PyObject *m_vt_attach(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
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
PyObject *m_vt_join(PyObject *mod, PyObject *unused) {
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
PyObject *m_vt_hit(PyObject *mod, PyObject *unused) {
    if (!vt_clk) Py_RETURN_NONE;
    if (__builtin_expect(__atomic_load_n(&vt_hdr[VH_ABORT], __ATOMIC_RELAXED), 0)) return vt_result(VT_ABORTED, "");
    if (*vt_clk * vt_n + vt_prio <= vt_hlimit) Py_RETURN_NONE;
    return vt_result(vt_yield(VS_READY), "yielded");
}

/* vt_spin(price): one poll of a spin-wait loop: price ns, then a scheduling point; a poll with no
 * other runnable process waits for what nobody can change any more: a deadlock */
PyObject *m_vt_spin(PyObject *mod, PyObject *arg) {
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
PyObject *m_vt_block(PyObject *mod, PyObject *arg) {
    VT_ATTACHED();
    int64_t key;
    if (get_i64(arg, &key) < 0) return NULL;
    VSLOT(vt_me)[VS_KEY] = key;
    vt_hdr[VH_BLOCKED]++;
    return vt_result(vt_yield(VS_BLOCKED), "waits for a release");
}

/* vt_released(key, price): the waiters on key run again at max(own clock, this clock + price) */
PyObject *m_vt_released(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
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
PyObject *m_vt_sleep(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
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
PyObject *m_vt_kick(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
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
PyObject *m_vt_done(PyObject *mod, PyObject *unused) {
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
PyObject *m_vt_abort(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
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

PyObject *m_vt_detach(PyObject *mod, PyObject *unused) {
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
PyObject *m_vt_enable(PyObject *mod, PyObject *arg) {
    int was = vt_on, on = PyObject_IsTrue(arg);
    if (on < 0) return NULL;
    vt_on = on && vt_clk != NULL;
    return PyBool_FromLong(was);
}

/* vt_advance(ns) -> the clock after adding ns (guest time, modelled waits); no charge */
PyObject *m_vt_advance(PyObject *mod, PyObject *arg) {
    int64_t ns;
    if (get_i64(arg, &ns) < 0) return NULL;
    if (!vt_clk) { PyErr_SetString(PyExc_RuntimeError, "vt_advance: no virtual clock attached"); return NULL; }
    if (ns > 0) *vt_clk += ns;
    return PyLong_FromLongLong(*vt_clk);
}

/* vt_now() -> this process' virtual clock, or None when none is attached (no price) */
PyObject *m_vt_now(PyObject *mod, PyObject *unused) {
    if (!vt_clk) Py_RETURN_NONE;
    return PyLong_FromLongLong(*vt_clk);
}

PyObject *m_vt_transfers(PyObject *mod, PyObject *unused) { return PyLong_FromLongLong(vt_transfers); }

PyObject *m_vt_seed(PyObject *mod, PyObject *arg) {
    int64_t v;
    if (get_i64(arg, &v) < 0) return NULL;
    vt_hist_seed = (uint64_t)v;
    Py_RETURN_NONE;
}
