/*
 * ipc/prims/preempt.c -- preemption points inside the primitives (ipc/fuzz.py).
 *
 * Named points inside the multi-step sequences of the primitives (the RCU read-side entry between
 * loading the gp counter and storing the slot; the lock slow paths between the failed try and the
 * wait).  Off (pp_hook == NULL, the default) a point is one load of a global and a not-taken
 * branch.  On (set_preempt_hook(callable)), the hook is called with the point's name (a str made
 * once) with the GIL held, while the primitive holds nothing that another process needs to make
 * progress (no spin lock; a Mutex waiter has at most marked the futex word contended, which every
 * waiter does): ipc/fuzz.py routes it to the Python points (--fuzz widening, explore's scheduling
 * points, the torture readers' delays).  An exception from the hook (ScheduleAborted, SystemExit,
 * ...) ends the C call with NULL; every point states next to it why the primitive is then
 * consistent.
 *
 * The hook may release the GIL (sleep, futex wait): the Mem is marked busy around the call, as
 * around every blocking section, and if it was released meanwhile the call fails without touching
 * the buffer again (pp_call returns PP_GONE).  Points reached while a hook call is in progress (the
 * hook's own primitives, or another thread while the hook has dropped the GIL) are skipped: the
 * hook is never re-entered.  The hook is inherited by fork()ed children, as fuzz.ACTIVE is.
 *
 * The points themselves (PREEMPT_POINT in prims.h) sit in spin.c, mutex.c, rwlock.c and rcu.c, each
 * with the argument why an exception there leaves its primitive consistent; this file holds the
 * hook, its call and the fork() reset.
 */
#include "prims.h"

static const char *const pp_names[PP_N] = {
    "rcu.read_lock.after_ctr_load", "spin.slow.after_trylock", "mutex.slow.after_trylock",
    "mutex.slow.before_sleep", "rw.read.slow.after_backoff", "rw.write.slow.after_trylock",
    "rw.write.slow.after_claim"};
static PyObject *pp_str[PP_N];  /* the names as str (module init) */
PyObject *pp_hook;              /* NULL = points off */
static int pp_running;          /* a hook call is in progress */
static MemObject *pp_mem;       /* ... on this Mem (busy) */
static pthread_t pp_thread;     /* ... in this thread (a fork()ed child keeps only the forking thread) */

/* Call the hook at point `id` of a primitive working on `m`'s words.  PP_OK; PP_ERROR: the hook
 * raised (exception set; the buffer is still mapped); PP_GONE: the Mem was released while the hook
 * ran (exception set; the caller must not touch the buffer).  `wake_on_gone`: a futex word to wake
 * one waiter on before the buffer may go (a Mutex waiter never swallows a wake-up). */
__attribute__((noinline, cold)) int pp_call(MemObject *m, int id, int32_t *wake_on_gone) {
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

/* a hook call of another thread is not in a fork()ed child: its point and its busy count go (a
 * fork() from inside the hook, in this thread, returns to it and ends the call itself) */
void pp_after_fork(void) {
    if (pp_running && !pthread_equal(pp_thread, pthread_self())) {
        pp_mem->busy--;
        pp_running = 0;
    }
}

/* the names as str, made once (module init) */
int pp_init_names(void) {
    for (int i = 0; i < PP_N; i++)
        if (!pp_str[i] && !(pp_str[i] = PyUnicode_InternFromString(pp_names[i]))) return -1;
    return 0;
}

/* ------------------------------------------------------------------ module functions */

PyObject *m_set_preempt_hook(PyObject *mod, PyObject *hook) {
    if (hook != Py_None && !PyCallable_Check(hook)) {
        PyErr_SetString(PyExc_TypeError, "set_preempt_hook: need a callable(name) or None");
        return NULL;
    }
    PyObject *old = pp_hook;
    pp_hook = hook == Py_None ? NULL : Py_NewRef(hook);
    return old ? old : Py_NewRef(Py_None);  /* the reference pp_hook held */
}

PyObject *m_preempt_points(PyObject *mod, PyObject *unused) {
    PyObject *t = PyTuple_New(PP_N);
    if (!t) return NULL;
    for (int i = 0; i < PP_N; i++) PyTuple_SET_ITEM(t, i, Py_NewRef(pp_str[i]));
    return t;
}
