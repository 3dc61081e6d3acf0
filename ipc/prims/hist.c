/*
 * ipc/prims/hist.c -- Histogram: a log-linear latency histogram on shared-memory words.
 *
 * One histogram per process (single writer: relaxed loads and stores, no RMW; readers merge the
 * per-process blocks with numpy, ipc/hist.py).  Layout in prims.h: count, sum, max, min, then
 * HIST_BUCKETS buckets, 8 sub-buckets per power of two (hist_bucket).  Exact (every = 1) or
 * sampled with weights (below).
 */
#include "prims.h"

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

PyTypeObject HistType = {
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

PyObject *m_hist_bucket(PyObject *mod, PyObject *arg) {
    int64_t v;
    if (get_i64(arg, &v) < 0) return NULL;
    return PyLong_FromLong(hist_bucket(v));
}
