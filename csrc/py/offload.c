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
/* One of the engine's calls, run without the GIL between engine_enter and
 * engine_leave: while one runs, close() from another thread leaves the
 * engine to the last call out, which frees it. */
typedef struct engine_call {
    mlu_cuda_offload *eng; /* borrowed from the engine object while the call runs */
    mlu_status st;         /* what the core call answered */
    mlu_error err;
} engine_call;

/* Begins call c on the open engine: 0, or -1 with ValueError when it is
 * closed or, for a call that names a size (`what` not NULL), when nbytes is
 * not > 0. */
static int engine_enter(EngineObject *self, engine_call *c, const char *what, Py_ssize_t nbytes)
{
    int rc = -1;

    if (self->eng == NULL) {
        PyErr_SetString(PyExc_ValueError, "CudaOffloadEngine is closed");
        goto done;
    }
    if (what != NULL && nbytes <= 0) {
        PyErr_Format(PyExc_ValueError, "%s: nbytes must be > 0, got %zd", what, nbytes);
        goto done;
    }
    mlu_error_clear(&c->err);
    c->st = MLU_OK;
    c->eng = self->eng;
    self->busy++;
    rc = 0;
done:
    return rc;
}

/* Ends call c: 0, or -1 with the call's error raised. */
static int engine_leave(EngineObject *self, const engine_call *c)
{
    if (--self->busy == 0 && self->closing != NULL) {
        mlu_cuda_offload *closing = self->closing;
        self->closing = NULL;
        Py_BEGIN_ALLOW_THREADS
        mlu_cuda_offload_destroy(closing);
        Py_END_ALLOW_THREADS
    }
    if (c->st != MLU_OK) {
        raise_for(Py_TYPE(self), &c->err);
        return -1;
    }
    return 0;
}

#define PTR(x) ((void *)(uintptr_t)(x))

/* streams() -> (d2h, h2d) */
static PyObject *Engine_streams(EngineObject *self, PyObject *unused)
{
    void *d2h = NULL, *h2d = NULL;
    engine_call c;

    (void)unused;
    if (engine_enter(self, &c, NULL, 0) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    c.st = mlu_cuda_offload_streams(c.eng, &d2h, &h2d, &c.err);
    Py_END_ALLOW_THREADS
    if (engine_leave(self, &c) < 0)
        return NULL;
    return Py_BuildValue("(KK)", (unsigned long long)(uintptr_t)d2h, (unsigned long long)(uintptr_t)h2d);
}

/* save(ptr, nbytes, mode=0, scratch=0, stream=0) -> handle */
static PyObject *Engine_save(EngineObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"ptr", "nbytes", "mode", "scratch", "stream", NULL};
    unsigned long long ptr, scratch = 0, stream = 0;
    Py_ssize_t nbytes;
    int mode = 0;
    int64_t handle = -1;
    engine_call c;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "Kn|iKK:save", kwlist, &ptr, &nbytes, &mode, &scratch, &stream) ||
        engine_enter(self, &c, "save", nbytes) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    c.st = mlu_cuda_offload_save(c.eng, PTR(ptr), (size_t)nbytes, mode, PTR(scratch), PTR(stream), &handle, &c.err);
    Py_END_ALLOW_THREADS
    if (engine_leave(self, &c) < 0)
        return NULL;
    return PyLong_FromLongLong((long long)handle);
}

/* load(handle, ptr, nbytes, scratch=0, stream=0) */
static PyObject *Engine_load(EngineObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"handle", "ptr", "nbytes", "scratch", "stream", NULL};
    unsigned long long ptr, scratch = 0, stream = 0;
    long long handle;
    Py_ssize_t nbytes;
    engine_call c;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "LKn|KK:load", kwlist, &handle, &ptr, &nbytes, &scratch, &stream) ||
        engine_enter(self, &c, "load", nbytes) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    c.st = mlu_cuda_offload_load(c.eng, (int64_t)handle, PTR(ptr), (size_t)nbytes, PTR(scratch), PTR(stream), &c.err);
    Py_END_ALLOW_THREADS
    if (engine_leave(self, &c) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* wait(handle, stream=0) */
static PyObject *Engine_wait(EngineObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"handle", "stream", NULL};
    unsigned long long stream = 0;
    long long handle;
    engine_call c;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "L|K:wait", kwlist, &handle, &stream) ||
        engine_enter(self, &c, NULL, 0) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    c.st = mlu_cuda_offload_wait(c.eng, (int64_t)handle, PTR(stream), &c.err);
    Py_END_ALLOW_THREADS
    if (engine_leave(self, &c) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* sync(handle) / release(handle): the handle, then fn without the GIL. */
static PyObject *engine_handle_call(EngineObject *self, PyObject *arg,
                                    mlu_status (*fn)(mlu_cuda_offload *e, int64_t handle, mlu_error *err))
{
    long long handle = PyLong_AsLongLong(arg);
    engine_call c;

    if ((handle == -1 && PyErr_Occurred()) || engine_enter(self, &c, NULL, 0) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    c.st = fn(c.eng, (int64_t)handle, &c.err);
    Py_END_ALLOW_THREADS
    if (engine_leave(self, &c) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Engine_sync(EngineObject *self, PyObject *arg)
{
    return engine_handle_call(self, arg, mlu_cuda_offload_sync);
}

static PyObject *Engine_release(EngineObject *self, PyObject *arg)
{
    return engine_handle_call(self, arg, mlu_cuda_offload_release);
}

/* stats() -> dict of the pinned pool's counters and the live handles */
static PyObject *Engine_stats(EngineObject *self, PyObject *unused)
{
    mlu_pool_stats stats;
    int64_t handles = 0;
    engine_call c;

    (void)unused;
    memset(&stats, 0, sizeof(stats));
    if (engine_enter(self, &c, NULL, 0) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    c.st = mlu_cuda_offload_stats(c.eng, &stats, &handles, &c.err);
    Py_END_ALLOW_THREADS
    if (engine_leave(self, &c) < 0)
        return NULL;
    return stats_dict(&stats, handles);
}

/* trim() -> bytes freed */
static PyObject *Engine_trim(EngineObject *self, PyObject *unused)
{
    uint64_t freed = 0;
    engine_call c;

    (void)unused;
    if (engine_enter(self, &c, NULL, 0) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    c.st = mlu_cuda_offload_trim(c.eng, &freed, &c.err);
    Py_END_ALLOW_THREADS
    if (engine_leave(self, &c) < 0)
        return NULL;
    return PyLong_FromUnsignedLongLong(freed);
}

/* window(max_inflight=<keep>) -> {"max_inflight": int or None, "waits": int} */
static PyObject *Engine_window(EngineObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"max_inflight", NULL};
    PyObject *limit_obj = NULL;
    size_t limit = 0;
    uint64_t waits = 0;
    engine_call c;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "|O:window", kwlist, &limit_obj))
        return NULL;
    if (limit_obj != NULL && parse_bytes_limit(limit_obj, "max_inflight", &limit) < 0)
        return NULL;
    if (engine_enter(self, &c, NULL, 0) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    c.st = mlu_cuda_offload_window(c.eng, limit_obj != NULL ? &limit : NULL, &limit, &waits, &c.err);
    Py_END_ALLOW_THREADS
    if (engine_leave(self, &c) < 0)
        return NULL;
    if (limit == SIZE_MAX)
        return Py_BuildValue("{s:O,s:K}", "max_inflight", Py_None, "waits", (unsigned long long)waits);
    return Py_BuildValue("{s:K,s:K}", "max_inflight", (unsigned long long)limit, "waits", (unsigned long long)waits);
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
