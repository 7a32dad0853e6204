/* offload.c: the Python face of the activation-offload engine.
 *
 * HostPool: the offload pool over malloc'd memory (the CPU engine of
 * mlutils.offload and the pool's Python tests).  CudaOffloadEngine: the
 * CUDA engine of csrc/cuda/offload.cu (raises RuntimeError "built without
 * CUDA" on builds without nvcc).  Both are private to mlutils.offload. */
#include "module.h"

#include <stdlib.h>
#include <string.h>

#include "../core/offload_layout.h"
#include "../core/offload_pool.h"
#include "../cuda/mlu_cuda_offload.h"

/* The counters as a dict; `handles` (live engine handles) only when >= 0. */
static PyObject *stats_dict(const mlu_pool_stats *s, int64_t handles)
{
    PyObject *d = Py_BuildValue("{s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K}",
                         "cap", (unsigned long long)s->cap,
                         "reserved", (unsigned long long)s->reserved,
                         "in_use", (unsigned long long)s->in_use,
                         "requested", (unsigned long long)s->requested,
                         "peak_reserved", (unsigned long long)s->peak_reserved,
                         "blocks", (unsigned long long)s->blocks,
                         "acquires", (unsigned long long)s->acquires,
                         "reuses", (unsigned long long)s->reuses,
                         "allocs", (unsigned long long)s->allocs,
                         "frees", (unsigned long long)s->frees);
    PyObject *h;

    if (d == NULL || handles < 0)
        return d;
    h = PyLong_FromLongLong(handles);
    if (h == NULL || PyDict_SetItemString(d, "handles", h) < 0) {
        Py_XDECREF(h);
        Py_DECREF(d);
        return NULL;
    }
    Py_DECREF(h);
    return d;
}

/* max_bytes: None (no cap) or an int >= 0 -> *cap. */
static int parse_bytes_limit(PyObject *obj, const char *what, size_t *cap)
{
    if (obj == NULL || obj == Py_None) {
        *cap = SIZE_MAX;
        return 0;
    }
    *cap = PyLong_AsSize_t(obj);
    if (*cap == (size_t)-1 && PyErr_Occurred()) {
        if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError, "%s must be None or an int >= 0", what);
        }
        return -1;
    }
    return 0;
}

static int parse_cap(PyObject *obj, size_t *cap)
{
    return parse_bytes_limit(obj, "max_bytes", cap);
}

/* Raises a core error for one of this file's types (borrowed); NULL. */
static PyObject *raise_for(PyTypeObject *type, const mlu_error *err)
{
    mlu_state *st = mlu_state_from_type(type); /* borrowed; NULL with an exception set */

    return st == NULL ? NULL : mlu_raise(st, err, MLU_DOMAIN_VALUE, NULL);
}

/* The slots and spec of one of this file's types: <prefix>_new, _dealloc and
 * _methods, its name under mlutils._core (tpname) and its docstring. */
#define OFFLOAD_TYPE(prefix, object, tpname, doc)                              \
    static PyType_Slot prefix##_slots[] = {                                    \
        {Py_tp_new, (void *)prefix##_new},                                     \
        {Py_tp_dealloc, (void *)prefix##_dealloc},                             \
        {Py_tp_methods, prefix##_methods},                                     \
        {Py_tp_doc, doc},                                                      \
        {0, NULL},                                                             \
    };                                                                         \
    static PyType_Spec prefix##_spec = {                                       \
        .name = "mlutils._core." tpname,                                       \
        .basicsize = sizeof(object),                                           \
        .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,                \
        .slots = prefix##_slots,                                               \
    };

/* ------------------------------------------------------------------ HostPool */

typedef struct {
    PyObject_HEAD
    mlu_offload_pool *pool; /* owned */
} HostPoolObject;

static void *host_alloc(void *ctx, size_t n, mlu_error *err)
{
    void *p = malloc(n);
    (void)ctx;
    if (p == NULL)
        mlu_error_set(err, MLU_ENOMEM, -1, "malloc of %zu bytes failed", n);
    return p;
}

static void host_free(void *ctx, void *p)
{
    (void)ctx;
    free(p);
}

static PyObject *HostPool_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"max_bytes", NULL};
    mlu_pool_allocator a = {host_alloc, host_free, NULL, "host memory"};
    PyObject *cap_obj = Py_None;
    HostPoolObject *self = NULL;
    size_t cap;
    mlu_error err;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "|O:HostPool", kwlist, &cap_obj))
        return NULL;
    if (parse_cap(cap_obj, &cap) < 0)
        return NULL;
    self = (HostPoolObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    mlu_error_clear(&err);
    if (mlu_offload_pool_new(&a, cap, &self->pool, &err) != MLU_OK) {
        Py_DECREF(self);
        return raise_for(type, &err);
    }
    return (PyObject *)self;
}

static void HostPool_dealloc(HostPoolObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);

    mlu_offload_pool_free(self->pool);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

/* acquire(nbytes) -> (id, memoryview): the view is writable, nbytes long, and
 * valid until release(id). */
static PyObject *HostPool_acquire(HostPoolObject *self, PyObject *arg)
{
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    int64_t id;
    void *ptr;
    size_t size;
    mlu_error err;
    PyObject *view, *res;

    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (n <= 0) {
        PyErr_Format(PyExc_ValueError, "HostPool.acquire: nbytes must be > 0, got %zd", n);
        return NULL;
    }
    mlu_error_clear(&err);
    if (mlu_offload_pool_acquire(self->pool, (size_t)n, &id, &ptr, &size, &err) != MLU_OK)
        return raise_for(Py_TYPE(self), &err);
    view = PyMemoryView_FromMemory((char *)ptr, n, PyBUF_WRITE);
    if (view == NULL) {
        mlu_offload_pool_release(self->pool, id, NULL);
        return NULL;
    }
    res = Py_BuildValue("(LN)", (long long)id, view); /* steals view */
    if (res == NULL)
        mlu_offload_pool_release(self->pool, id, NULL);
    return res;
}

static PyObject *HostPool_release(HostPoolObject *self, PyObject *arg)
{
    long long id = PyLong_AsLongLong(arg);
    mlu_error err;

    if (id == -1 && PyErr_Occurred())
        return NULL;
    mlu_error_clear(&err);
    if (mlu_offload_pool_release(self->pool, (int64_t)id, &err) != MLU_OK)
        return raise_for(Py_TYPE(self), &err);
    Py_RETURN_NONE;
}

static PyObject *HostPool_trim(HostPoolObject *self, PyObject *unused)
{
    (void)unused;
    return PyLong_FromUnsignedLongLong(mlu_offload_pool_trim(self->pool));
}

static PyObject *HostPool_stats(HostPoolObject *self, PyObject *unused)
{
    mlu_pool_stats s;

    (void)unused;
    mlu_offload_pool_stats(self->pool, &s);
    return stats_dict(&s, -1);
}

static PyObject *HostPool_set_cap(HostPoolObject *self, PyObject *arg)
{
    size_t cap;

    if (parse_cap(arg, &cap) < 0)
        return NULL;
    mlu_offload_pool_set_cap(self->pool, cap);
    Py_RETURN_NONE;
}

static PyObject *HostPool_check(HostPoolObject *self, PyObject *unused)
{
    mlu_error err, broken;
    mlu_state *st;

    (void)unused;
    mlu_error_clear(&err);
    if (mlu_offload_pool_check(self->pool, &err) == MLU_OK)
        Py_RETURN_NONE;
    st = mlu_state_from_type(Py_TYPE(self)); /* borrowed; NULL with an exception set */
    if (st == NULL)
        return NULL;
    mlu_error_clear(&broken);
    mlu_error_set(&broken, err.code, err.offset, "offload pool invariant broken: %s", err.text);
    return mlu_raise(st, &broken, MLU_DOMAIN_SELF_CHECK, NULL);
}

static PyMethodDef HostPool_methods[] = {
    {"acquire", (PyCFunction)HostPool_acquire, METH_O,
     "acquire(nbytes) -> (id, memoryview): a pooled buffer, valid until release(id)."},
    {"release", (PyCFunction)HostPool_release, METH_O, "release(id): back to the pool."},
    {"trim", (PyCFunction)HostPool_trim, METH_NOARGS, "trim() -> int: frees cached buffers, returns bytes."},
    {"stats", (PyCFunction)HostPool_stats, METH_NOARGS, "stats() -> dict of the pool's counters."},
    {"set_cap", (PyCFunction)HostPool_set_cap, METH_O, "set_cap(max_bytes or None)."},
    {"check", (PyCFunction)HostPool_check, METH_NOARGS, "check(): AssertionError when an invariant is broken."},
    {NULL, NULL, 0, NULL},
};

OFFLOAD_TYPE(HostPool, HostPoolObject, "HostPool",
             "HostPool(max_bytes=None): size-classed, capped pool of host buffers.")

/* --------------------------------------------------------- CudaOffloadEngine */

typedef struct {
    PyObject_HEAD
    mlu_cuda_offload *eng;     /* owned; NULL after close() */
    mlu_cuda_offload *closing; /* owned: closed while calls were running; the last one frees it */
    int busy;                  /* calls running without the GIL */
    int device;
} EngineObject;

static PyObject *Engine_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"device", "max_bytes", NULL};
    PyObject *cap_obj = Py_None;
    EngineObject *self = NULL;
    int device = 0;
    size_t cap;
    mlu_error err;
    mlu_status st;
    mlu_cuda_offload *eng = NULL;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "|iO:CudaOffloadEngine", kwlist, &device, &cap_obj))
        return NULL;
    if (parse_cap(cap_obj, &cap) < 0)
        return NULL;
    mlu_error_clear(&err);
    Py_BEGIN_ALLOW_THREADS
    st = mlu_cuda_offload_new(device, cap, &eng, &err);
    Py_END_ALLOW_THREADS
    if (st != MLU_OK)
        return raise_for(type, &err);
    self = (EngineObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        mlu_cuda_offload_destroy(eng);
        return NULL;
    }
    self->eng = eng;
    self->device = device;
    return (PyObject *)self;
}

static void Engine_dealloc(EngineObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);

    mlu_cuda_offload_destroy(self->eng);
    mlu_cuda_offload_destroy(self->closing);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}
/* The engine's calls: each method parses into engine_args and runs one core
 * call of its kind through engine_call (open check, no GIL, raise). */
typedef enum engine_op {
    OP_STREAMS, OP_SAVE, OP_LOAD, OP_WAIT, OP_SYNC, OP_RELEASE, OP_STATS, OP_TRIM, OP_WINDOW, OP_COUNT
} engine_op;

static const char *const op_names[OP_COUNT] = {
    "streams", "save", "load", "wait", "sync", "release", "stats", "trim", "window",
};

/* A call's arguments and results, by name; addresses are device pointers and cudaStream_t. */
typedef struct engine_args {
    long long handle;                        /* in; out of save */
    unsigned long long ptr, scratch, stream; /* in */
    Py_ssize_t nbytes;                       /* in: save, load (> 0) */
    int mode;                                /* in: save */
    void *d2h, *h2d;                         /* out: streams */
    mlu_pool_stats stats;                    /* out: stats */
    int64_t handles;                         /* out: stats */
    uint64_t freed;                          /* out: trim */
    int set_window;                          /* in: window (0: only read it) */
    size_t window;                           /* in/out: window's limit (SIZE_MAX: none) */
    uint64_t waits;                          /* out: window */
} engine_args;

#define PTR(x) ((void *)(uintptr_t)(x))

static mlu_status engine_run(mlu_cuda_offload *eng, engine_op op, engine_args *a, mlu_error *err)
{
    int64_t handle = (int64_t)a->handle;
    mlu_status st;

    switch (op) {
    case OP_STREAMS:
        return mlu_cuda_offload_streams(eng, &a->d2h, &a->h2d, err);
    case OP_SAVE:
        st = mlu_cuda_offload_save(eng, PTR(a->ptr), (size_t)a->nbytes, a->mode, PTR(a->scratch), PTR(a->stream),
                                   &handle, err);
        a->handle = (long long)handle;
        return st;
    case OP_LOAD:
        return mlu_cuda_offload_load(eng, handle, PTR(a->ptr), (size_t)a->nbytes, PTR(a->scratch), PTR(a->stream),
                                     err);
    case OP_WAIT:
        return mlu_cuda_offload_wait(eng, handle, PTR(a->stream), err);
    case OP_SYNC:
        return mlu_cuda_offload_sync(eng, handle, err);
    case OP_RELEASE:
        return mlu_cuda_offload_release(eng, handle, err);
    case OP_STATS:
        return mlu_cuda_offload_stats(eng, &a->stats, &a->handles, err);
    case OP_TRIM:
        return mlu_cuda_offload_trim(eng, &a->freed, err);
    case OP_WINDOW:
        return mlu_cuda_offload_window(eng, a->set_window ? &a->window : NULL, &a->window, &a->waits, err);
    default:
        return mlu_error_set(err, MLU_EINVAL, -1, "unknown offload call %d", (int)op);
    }
}

/* Runs op on the open engine without the GIL: 0, or -1 with an exception set. */
static int engine_call(EngineObject *self, engine_op op, engine_args *a)
{
    mlu_cuda_offload *eng;
    mlu_error err;
    mlu_status st;

    if (self->eng == NULL) {
        PyErr_SetString(PyExc_ValueError, "CudaOffloadEngine is closed");
        return -1;
    }
    if ((op == OP_SAVE || op == OP_LOAD) && a->nbytes <= 0) {
        PyErr_Format(PyExc_ValueError, "%s: nbytes must be > 0, got %zd", op_names[op], a->nbytes);
        return -1;
    }
    mlu_error_clear(&err);
    eng = self->eng;
    self->busy++; /* close() from another thread meanwhile leaves eng to us */
    Py_BEGIN_ALLOW_THREADS
    st = engine_run(eng, op, a, &err);
    Py_END_ALLOW_THREADS
    if (--self->busy == 0 && self->closing != NULL) {
        mlu_cuda_offload *closing = self->closing;
        self->closing = NULL;
        Py_BEGIN_ALLOW_THREADS
        mlu_cuda_offload_destroy(closing);
        Py_END_ALLOW_THREADS
    }
    if (st != MLU_OK) {
        raise_for(Py_TYPE(self), &err);
        return -1;
    }
    return 0;
}

#define ENGINE_ARGS_INIT {-1, 0, 0, 0, 0, 0, NULL, NULL, {0}, 0, 0, 0, 0, 0}

static PyObject *Engine_streams(EngineObject *self, PyObject *unused)
{
    engine_args a = ENGINE_ARGS_INIT;

    (void)unused;
    if (engine_call(self, OP_STREAMS, &a) < 0)
        return NULL;
    return Py_BuildValue("(KK)", (unsigned long long)(uintptr_t)a.d2h, (unsigned long long)(uintptr_t)a.h2d);
}

/* save(ptr, nbytes, mode=0, scratch=0, stream=0) -> handle */
static PyObject *Engine_save(EngineObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"ptr", "nbytes", "mode", "scratch", "stream", NULL};
    engine_args a = ENGINE_ARGS_INIT;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "Kn|iKK:save", kwlist, &a.ptr, &a.nbytes, &a.mode, &a.scratch,
                                     &a.stream) ||
        engine_call(self, OP_SAVE, &a) < 0)
        return NULL;
    return PyLong_FromLongLong(a.handle);
}

/* load(handle, ptr, nbytes, scratch=0, stream=0) */
static PyObject *Engine_load(EngineObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"handle", "ptr", "nbytes", "scratch", "stream", NULL};
    engine_args a = ENGINE_ARGS_INIT;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "LKn|KK:load", kwlist, &a.handle, &a.ptr, &a.nbytes, &a.scratch,
                                     &a.stream) ||
        engine_call(self, OP_LOAD, &a) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* wait(handle, stream=0) */
static PyObject *Engine_wait(EngineObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"handle", "stream", NULL};
    engine_args a = ENGINE_ARGS_INIT;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "L|K:wait", kwlist, &a.handle, &a.stream) ||
        engine_call(self, OP_WAIT, &a) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* sync(handle) / release(handle): one handle argument. */
static PyObject *engine_handle_call(EngineObject *self, PyObject *arg, engine_op op)
{
    engine_args a = ENGINE_ARGS_INIT;

    a.handle = PyLong_AsLongLong(arg);
    if ((a.handle == -1 && PyErr_Occurred()) || engine_call(self, op, &a) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Engine_sync(EngineObject *self, PyObject *arg)
{
    return engine_handle_call(self, arg, OP_SYNC);
}

static PyObject *Engine_release(EngineObject *self, PyObject *arg)
{
    return engine_handle_call(self, arg, OP_RELEASE);
}

static PyObject *Engine_stats(EngineObject *self, PyObject *unused)
{
    engine_args a = ENGINE_ARGS_INIT;

    (void)unused;
    if (engine_call(self, OP_STATS, &a) < 0)
        return NULL;
    return stats_dict(&a.stats, a.handles);
}

static PyObject *Engine_trim(EngineObject *self, PyObject *unused)
{
    engine_args a = ENGINE_ARGS_INIT;

    (void)unused;
    if (engine_call(self, OP_TRIM, &a) < 0)
        return NULL;
    return PyLong_FromUnsignedLongLong(a.freed);
}

/* window(max_inflight=<keep>) -> {"max_inflight": int or None, "waits": int} */
static PyObject *Engine_window(EngineObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"max_inflight", NULL};
    PyObject *limit_obj = NULL;
    engine_args a = ENGINE_ARGS_INIT;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "|O:window", kwlist, &limit_obj))
        return NULL;
    if (limit_obj != NULL && parse_bytes_limit(limit_obj, "max_inflight", &a.window) < 0)
        return NULL;
    a.set_window = limit_obj != NULL;
    if (engine_call(self, OP_WINDOW, &a) < 0)
        return NULL;
    if (a.window == SIZE_MAX)
        return Py_BuildValue("{s:O,s:K}", "max_inflight", Py_None, "waits", (unsigned long long)a.waits);
    return Py_BuildValue("{s:K,s:K}", "max_inflight", (unsigned long long)a.window, "waits",
                         (unsigned long long)a.waits);
}

static PyObject *Engine_close(EngineObject *self, PyObject *unused)
{
    mlu_cuda_offload *eng = self->eng;

    (void)unused;
    self->eng = NULL;
    if (self->busy > 0) { /* a call running without the GIL uses it: the last one frees it */
        if (eng != NULL)
            self->closing = eng;
        Py_RETURN_NONE;
    }
    Py_BEGIN_ALLOW_THREADS
    mlu_cuda_offload_destroy(eng);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}
static PyMethodDef Engine_methods[] = {
    {"streams", (PyCFunction)Engine_streams, METH_NOARGS, "streams() -> (d2h, h2d) cudaStream_t values."},
    {"save", (PyCFunction)(void (*)(void))Engine_save, METH_VARARGS | METH_KEYWORDS,
     "save(ptr, nbytes, mode=0, scratch=0, stream=0) -> handle: start a device-to-host copy."},
    {"load", (PyCFunction)(void (*)(void))Engine_load, METH_VARARGS | METH_KEYWORDS,
     "load(handle, ptr, nbytes, scratch=0, stream=0): start the copy back into ptr."},
    {"wait", (PyCFunction)(void (*)(void))Engine_wait, METH_VARARGS | METH_KEYWORDS,
     "wait(handle, stream=0): stream waits for the load of handle."},
    {"sync", (PyCFunction)Engine_sync, METH_O, "sync(handle): block until handle's copies are done."},
    {"release", (PyCFunction)Engine_release, METH_O, "release(handle): forget it; its buffer returns to the pool."},
    {"stats", (PyCFunction)Engine_stats, METH_NOARGS, "stats() -> dict of the pinned pool's counters."},
    {"trim", (PyCFunction)Engine_trim, METH_NOARGS, "trim() -> int: free cached pinned buffers."},
    {"window", (PyCFunction)(void (*)(void))Engine_window, METH_VARARGS | METH_KEYWORDS,
     "window(max_inflight=<keep>) -> dict: the bound on bytes of sources waiting for their copy "
     "(None: no bound) and how many copies a save waited for because the window was full."},
    {"close", (PyCFunction)Engine_close, METH_NOARGS, "close(): wait for copies and free everything."},
    {NULL, NULL, 0, NULL},
};

OFFLOAD_TYPE(Engine, EngineObject, "CudaOffloadEngine",
             "CudaOffloadEngine(device=0, max_bytes=None): pinned pool, copy streams, events.")

/* offload_packed_size(mode, nelem) -> int: host bytes of a packed tensor. */
static PyObject *py_offload_packed_size(PyObject *m, PyObject *args)
{
    int mode;
    Py_ssize_t nelem;
    size_t n;

    (void)m;
    if (!PyArg_ParseTuple(args, "in:offload_packed_size", &mode, &nelem))
        return NULL;
    if (nelem < 0) {
        PyErr_SetString(PyExc_ValueError, "offload_packed_size: nelem must be >= 0");
        return NULL;
    }
    n = mlu_offload_packed_size(mode, (size_t)nelem);
    if (n == 0) {
        PyErr_Format(PyExc_ValueError, "offload_packed_size: bad mode %d or size", mode);
        return NULL;
    }
    return PyLong_FromSize_t(n);
}

int mlu_offload_module_init(PyObject *m)
{
    static PyMethodDef methods[] = {
        {"offload_packed_size", py_offload_packed_size, METH_VARARGS,
         "offload_packed_size(mode, nelem) -> int: bytes of a packed (compressed) tensor."},
        {NULL, NULL, 0, NULL},
    };

    mlu_state *st = mlu_get_state(m);
    PyObject *e4m3_max = NULL; /* new ref */
    int rc = -1;

    if (mlu_add_heap_type(m, &HostPool_spec, &st->offload_pool_type) < 0 ||
        mlu_add_heap_type(m, &Engine_spec, &st->offload_engine_type) < 0)
        goto done;
    if (PyModule_AddIntConstant(m, "OFFLOAD_RAW", MLU_OFFLOAD_RAW) < 0 ||
        PyModule_AddIntConstant(m, "OFFLOAD_F32_BF16", MLU_OFFLOAD_F32_BF16) < 0 ||
        PyModule_AddIntConstant(m, "OFFLOAD_F16_E4M3", MLU_OFFLOAD_F16_E4M3) < 0 ||
        PyModule_AddIntConstant(m, "OFFLOAD_BF16_E4M3", MLU_OFFLOAD_BF16_E4M3) < 0 ||
        PyModule_AddIntConstant(m, "OFFLOAD_DEFAULT_MAX_INFLIGHT", (long)MLU_OFFLOAD_DEFAULT_WINDOW) < 0)
        goto done;
    /* the e4m3 layout of core/offload_layout.h, for the CPU engine's packing */
    if (PyModule_AddIntConstant(m, "OFFLOAD_E4M3_TRAILER", MLU_OFFLOAD_E4M3_TRAILER) < 0 ||
        PyModule_AddIntConstant(m, "OFFLOAD_E4M3_AMAX_AT", MLU_OFFLOAD_E4M3_AMAX_AT) < 0)
        goto done;
    e4m3_max = PyFloat_FromDouble(MLU_OFFLOAD_E4M3_MAX);
    if (e4m3_max == NULL || PyModule_AddObjectRef(m, "OFFLOAD_E4M3_MAX", e4m3_max) < 0)
        goto done;
    rc = PyModule_AddFunctions(m, methods);
done:
    Py_XDECREF(e4m3_max);
    return rc;
}
