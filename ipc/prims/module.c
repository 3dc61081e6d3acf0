/*
 * ipc/prims/module.c -- the module ipc._prims: its method table and init.
 *
 * Every unit defines its functions and types (declared in prims.h); this file only lists them,
 * readies the types (the Traced* ones as subtypes of the plain ones), adds the constants the
 * Python side reads the layouts from, and registers the fork() reset of each unit's per-process
 * state.
 */
#include "prims.h"

/* this process' identity and per-process state, at module init and in every fork()ed child
 * (pthread_atfork): each unit resets its own */
static void after_fork_child(void) {
    holder_after_fork();
    vt_after_fork();
    pp_after_fork();
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
    {"trace_attach", (PyCFunction)(void (*)(void))m_trace_attach, METH_FASTCALL,
     "trace_attach(mem, header_index, events_index, nevents) or trace_attach(None): this process' ring"},
    {"trace_clock", (PyCFunction)m_trace_clock, METH_NOARGS,
     "trace_clock() -> (cycles?, anchor cycles, anchor ns, ns per cycle * 2**32): raw stamps -> ns"},
    {"trace_emit", (PyCFunction)(void (*)(void))m_trace_emit, METH_FASTCALL,
     "trace_emit(code, a=0, b=0): one event into this process' ring (no-op when none is attached)"},
    {NULL}
};

static struct PyModuleDef prims_module = {
    PyModuleDef_HEAD_INIT, "ipc._prims", "compiled shared-memory concurrency primitives", -1, module_methods
};

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
    if (pp_init_names() < 0) return NULL;
    /* the Traced* types (trace.c): subtypes of the plain ones */
    tspin_type.tp_base = &SpinLockType;
    tmutex_type.tp_base = &MutexType;
    trw_type.tp_base = &RwLockType;
    TracedRcuReaderType.tp_base = &ReaderType;
    PyTypeObject *ttypes[] = {&tspin_type, &tmutex_type, &trw_type, &TracedRcuReaderType};
    const char *tnames[] = {"TracedSpinLock", "TracedMutex", "TracedRwLock", "TracedRcuReader"};
    for (size_t i = 0; i < sizeof(ttypes) / sizeof(ttypes[0]); i++) {
        if (PyType_Ready(ttypes[i]) < 0) return NULL;
        Py_INCREF(ttypes[i]);
        if (PyModule_AddObject(m, tnames[i], (PyObject *)ttypes[i]) < 0) return NULL;
    }
    static const struct { const char *name; int value; } consts[] = {
        {"TR_EV_WORDS", TR_EV_WORDS}, {"TR_PH_B", TR_PH_B}, {"TR_PH_E", TR_PH_E}, {"TR_PH_I", TR_PH_I},
        {"TR_CAT_OP", TR_CAT_OP}, {"TR_CAT_WAIT", TR_CAT_WAIT}, {"TR_CAT_HOLD", TR_CAT_HOLD},
        {"TR_CAT_RCU", TR_CAT_RCU}};
    for (size_t i = 0; i < sizeof(consts) / sizeof(consts[0]); i++)
        if (PyModule_AddIntConstant(m, consts[i].name, consts[i].value) < 0) return NULL;
    return m;
}
