/*
 * ipc/prims/clock.c -- time: the stats clock and waiting for time to pass.
 *
 * cyc() reads the stats clock (cycles, or ns on the clock_gettime fallback), cyc_ns(d) turns a
 * delta of it into ns, cyc_abs_ns(c) turns a reading into CLOCK_MONOTONIC ns (those three are
 * inline in prims.h: the lock statistics take them on every acquisition).  This file holds the
 * calibration behind them (module init, re-anchoring every ~10 ms of cycles) and the clock
 * functions of the module: now_ns, stats_clock*, clock_source, cpu_relax, sched_yield, spin_ns.
 * Calibration state is per process (inherited by fork); every caller holds the GIL, so plain
 * globals suffice.
 */
#include "prims.h"

int clk_kind = CLK_MONO;
uint64_t clk_mult;                      /* ns per cycle, 32.32 fixed point */
int64_t clk_anchor_cyc, clk_anchor_ns;  /* last re-anchoring on CLOCK_MONOTONIC */
int64_t clk_reanchor_cyc;               /* re-anchor after this many cycles (~10 ms) */
int64_t clk_last_ns;                    /* cyc_abs_ns() never goes backwards */

#ifdef HAVE_CYCLES
static int64_t clk_base_cyc, clk_base_ns;      /* calibration origin (module init) */
#endif
#define CLK_REANCHOR_NS 10000000LL

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

int64_t cyc_abs_slow(int64_t c) {
    int64_t ac, an;
    clk_sample(&ac, &an);
    clk_anchor(ac, an);
    return c >= ac ? an + cyc_ns(c - ac) : an - cyc_ns(ac - c);
}
#else
int64_t cyc_abs_slow(int64_t c) { return c; }
#endif

void clk_init(void) {
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

const char *clk_name(void) {
    if (clk_kind != CLK_CYC) return "monotonic";
#if defined(__x86_64__)
    return "tsc";
#elif defined(__aarch64__)
    return "cntvct";
#else
    return "cycles";
#endif
}

/* ------------------------------------------------------------------ module functions */

PyObject *m_now_ns(PyObject *mod, PyObject *unused) { VT(VP_CLOCK); return PyLong_FromLongLong(clock_ns()); }
PyObject *m_cpu_relax(PyObject *mod, PyObject *unused) { VT(VP_RELAX); cpu_relax(); Py_RETURN_NONE; }

PyObject *m_clock_source(PyObject *mod, PyObject *unused) { return PyUnicode_FromString(clk_name()); }
PyObject *m_stats_clock(PyObject *mod, PyObject *unused) { VT(VP_CLOCK); return PyLong_FromLongLong(cyc()); }

PyObject *m_stats_clock_ns(PyObject *mod, PyObject *arg) {
    int64_t d;
    if (get_i64(arg, &d) < 0) return NULL;
    return PyLong_FromLongLong(cyc_ns(d));
}

PyObject *m_stats_clock_abs_ns(PyObject *mod, PyObject *arg) {
    int64_t c;
    if (get_i64(arg, &c) < 0) return NULL;
    return PyLong_FromLongLong(cyc_abs_ns(c));
}

PyObject *m_sched_yield(PyObject *mod, PyObject *unused) {
    Py_BEGIN_ALLOW_THREADS
    sched_yield();
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* spin_ns(ns): busy-wait for ns (guest run time), checking signals every ms. */
PyObject *m_spin_ns(PyObject *mod, PyObject *arg) {
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
