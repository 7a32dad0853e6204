/* nccl.c: the Python face of the NCCL loader and communicator
 * (csrc/cuda/nccl_loader.c, nccl_comm.c): nccl_load, nccl_unique_id and the
 * NcclComm type.  Buffers and streams arrive as integer addresses. */
#include "module.h"

#include "../cuda/nccl_comm.h"

#define COMM_TYPE(st) ((PyTypeObject *)(st)->nccl_comm_type)
#define REPORT_CAP 8192

/* The loaded library is process-wide (dlopen handles are), so it lives here
 * rather than in the module state; the GIL serialises every access. */
static mlu_nccl_lib nccl_lib;
static Py_ssize_t nccl_live_comms; /* NcclComm objects borrowing nccl_lib */

typedef struct {
    PyObject_HEAD
    mlu_nccl_comm *comm; /* owned; NULL only while being built */
} CommObject;

/* Raises for a failed call (a timeout is MLU_ETIMEDOUT: TimeoutError). */
static PyObject *comm_raise(PyObject *any, const mlu_error *err)
{
    mlu_state *st = PyModule_Check(any) ? mlu_get_state(any) : mlu_state_from_type(Py_TYPE(any));

    return st == NULL ? NULL : mlu_raise(st, err, MLU_DOMAIN_VALUE, NULL);
}

static int need_loaded(void)
{
    if (nccl_lib.handle == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "NCCL is not loaded: call nccl_load() first");
        return -1;
    }
    return 0;
}

/* What nccl_load() and nccl_loaded() return (fields by name, also a tuple). */
static PyStructSequence_Field library_fields[] = {
    {"path", "the libnccl.so.2 that was loaded"},
    {"version", "its ncclGetVersion() code (e.g. 22703 for 2.27.3)"},
    {NULL, NULL},
};
static PyStructSequence_Desc library_desc = {
    "mlutils._core.NcclLibrary", "The loaded NCCL library: path and version.", library_fields, 2,
};

/* New ref: NcclLibrary(path, version) of the loaded library. */
static PyObject *library_info(PyObject *m)
{
    PyObject *v[2];

    v[0] = PyUnicode_DecodeFSDefault(nccl_lib.path);
    v[1] = PyLong_FromLong((long)nccl_lib.version);
    return mlu_struct_new_steal(mlu_get_state(m)->nccl_library_type, v, 2);
}

/* nccl_load(dirs=()) -> NcclLibrary(path, version): loads libnccl.so.2 once. */
static PyObject *py_nccl_load(PyObject *m, PyObject *args)
{
    PyObject *dirs_obj = NULL, *seq = NULL, *result = NULL;
    const char **dirs = NULL;
    char *report = NULL;
    Py_ssize_t n = 0, i;
    mlu_error err;
    mlu_status st;

    if (!PyArg_ParseTuple(args, "|O:nccl_load", &dirs_obj))
        return NULL;
    if (nccl_lib.handle != NULL)
        return library_info(m);
    if (dirs_obj != NULL) {
        seq = PySequence_Fast(dirs_obj, "nccl_load: dirs must be a sequence of str"); /* new ref */
        if (seq == NULL)
            goto done;
        n = PySequence_Fast_GET_SIZE(seq);
    }
    dirs = PyMem_Calloc(n > 0 ? (size_t)n : 1, sizeof(*dirs));
    report = PyMem_Calloc(REPORT_CAP, 1);
    if (dirs == NULL || report == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i); /* borrowed */
        if (!PyUnicode_Check(item)) {
            PyErr_Format(PyExc_TypeError, "nccl_load: dirs[%zd] must be str, not %.80s", i,
                         Py_TYPE(item)->tp_name);
            goto done;
        }
        dirs[i] = PyUnicode_AsUTF8(item); /* borrowed from item */
        if (dirs[i] == NULL)
            goto done;
    }
    mlu_error_clear(&err);
    Py_BEGIN_ALLOW_THREADS
    st = mlu_nccl_open(&nccl_lib, dirs, (size_t)n, report, REPORT_CAP, &err);
    Py_END_ALLOW_THREADS
    if (st != MLU_OK) {
        PyObject *tried = PyUnicode_FromFormat( /* new ref */
            "Looked in:\n%sInstall it with `pip install nvidia-nccl-cu13` "
            "(nvidia-nccl-cu12 for CUDA 12), or set MLUTILS_NCCL_PATH to a "
            "libnccl.so.2 (2.18 or later)", report);
        if (tried != NULL)
            mlu_raise(mlu_get_state(m), &err, MLU_DOMAIN_LIBRARY, tried);
        Py_XDECREF(tried);
        goto done;
    }
    result = library_info(m);
done:
    PyMem_Free(report);
    PyMem_Free(dirs);
    Py_XDECREF(seq);
    return result;
}

/* nccl_loaded() -> NcclLibrary(path, version) or None */
static PyObject *py_nccl_loaded(PyObject *m, PyObject *unused)
{
    (void)unused;
    if (nccl_lib.handle == NULL)
        Py_RETURN_NONE;
    return library_info(m);
}

/* _nccl_unload(): forget the library (tests load several fakes in turn). */
static PyObject *py_nccl_unload(PyObject *m, PyObject *unused)
{
    (void)m;
    (void)unused;
    if (nccl_live_comms > 0) {
        PyErr_Format(PyExc_RuntimeError, "%zd NCCL communicator(s) still use the library",
                     nccl_live_comms);
        return NULL;
    }
    mlu_nccl_close(&nccl_lib);
    Py_RETURN_NONE;
}

/* nccl_unique_id() -> bytes (128): a new id from ncclGetUniqueId. */
static PyObject *py_nccl_unique_id(PyObject *m, PyObject *unused)
{
    mlu_nccl_unique_id id;
    mlu_error err;
    mlu_status st;

    (void)unused;
    if (need_loaded() < 0)
        return NULL;
    mlu_error_clear(&err);
    Py_BEGIN_ALLOW_THREADS
    st = mlu_nccl_unique_id_new(&nccl_lib, &id, &err);
    Py_END_ALLOW_THREADS
    if (st != MLU_OK)
        return comm_raise(m, &err);
    return PyBytes_FromStringAndSize(id.internal, sizeof(id.internal));
}

/* nccl_dtype_supported(dtype) -> bool for the loaded library. */
static PyObject *py_nccl_dtype_supported(PyObject *m, PyObject *arg)
{
    long dtype;

    (void)m;
    if (need_loaded() < 0)
        return NULL;
    dtype = PyLong_AsLong(arg);
    if (dtype == -1 && PyErr_Occurred())
        return NULL;
    return PyBool_FromLong(dtype >= 0 && dtype < MLU_NCCL_DTYPE_COUNT &&
                           mlu_nccl_dtype_supported(&nccl_lib, (int)dtype));
}

/* nccl_comm_init(nranks, unique_id, rank, timeout=0.0) -> NcclComm */
static PyObject *py_nccl_comm_init(PyObject *m, PyObject *args)
{
    int nranks, rank;
    double timeout = 0.0;
    Py_buffer uid;
    mlu_nccl_unique_id id;
    mlu_nccl_comm *comm = NULL;
    CommObject *self = NULL;
    PyTypeObject *type = COMM_TYPE(mlu_get_state(m));
    mlu_error err;
    mlu_status st;

    if (!PyArg_ParseTuple(args, "iy*i|d:nccl_comm_init", &nranks, &uid, &rank, &timeout))
        return NULL;
    if (uid.len != MLU_NCCL_UNIQUE_ID_BYTES) {
        PyErr_Format(PyExc_ValueError, "an NCCL unique id is %d bytes, got %zd",
                     MLU_NCCL_UNIQUE_ID_BYTES, uid.len);
        PyBuffer_Release(&uid);
        return NULL;
    }
    memcpy(id.internal, uid.buf, sizeof(id.internal));
    PyBuffer_Release(&uid);
    if (need_loaded() < 0)
        return NULL;
    self = (CommObject *)type->tp_alloc(type, 0); /* new ref */
    if (self == NULL)
        return NULL;
    mlu_error_clear(&err);
    Py_BEGIN_ALLOW_THREADS
    st = mlu_nccl_comm_init(&nccl_lib, nranks, &id, rank, timeout, &comm, &err);
    Py_END_ALLOW_THREADS
    if (st != MLU_OK) {
        Py_DECREF(self);
        return comm_raise(m, &err);
    }
    self->comm = comm;
    nccl_live_comms++;
    return (PyObject *)self;
}

static void comm_dealloc(PyObject *op)
{
    CommObject *self = (CommObject *)op;
    PyTypeObject *tp = Py_TYPE(op);

    if (self->comm != NULL) {
        Py_BEGIN_ALLOW_THREADS
        mlu_nccl_comm_free(self->comm);
        Py_END_ALLOW_THREADS
        self->comm = NULL;
        nccl_live_comms--;
    }
    tp->tp_free(op);
    Py_DECREF(tp);
}

#define PTR(x) ((void *)(uintptr_t)(x))

/* None, or the exception of a failed call (a timeout: TimeoutError). */
static PyObject *call_result(PyObject *op, mlu_status st, const mlu_error *err)
{
    if (st != MLU_OK)
        return comm_raise(op, err);
    Py_RETURN_NONE;
}

/* 0, or -1 with ValueError for a negative element count. */
static int check_count(Py_ssize_t count)
{
    if (count >= 0)
        return 0;
    PyErr_SetString(PyExc_ValueError, "count must be >= 0");
    return -1;
}

/* The core call of all_reduce, broadcast and reduce_scatter: send, recv,
 * count, dtype, then the reduction or the root. */
typedef mlu_status (*collective_fn)(mlu_nccl_comm *c, const void *send, void *recv, size_t count, int dtype,
                                    int op_or_root, void *stream, mlu_error *err);

/* Parses (send, recv, count, dtype, op or root, stream) by fmt and runs fn
 * without the GIL. */
static PyObject *collective(PyObject *op, PyObject *args, const char *fmt, collective_fn fn)
{
    mlu_nccl_comm *comm = ((CommObject *)op)->comm;
    unsigned long long send, recv, stream;
    Py_ssize_t count;
    int dtype, arg;
    mlu_error err;
    mlu_status st;

    if (!PyArg_ParseTuple(args, fmt, &send, &recv, &count, &dtype, &arg, &stream) || check_count(count) < 0)
        return NULL;
    mlu_error_clear(&err);
    Py_BEGIN_ALLOW_THREADS
    st = fn(comm, PTR(send), PTR(recv), (size_t)count, dtype, arg, PTR(stream), &err);
    Py_END_ALLOW_THREADS
    return call_result(op, st, &err);
}

/* all_reduce(send, recv, count, dtype, op, stream) */
static PyObject *comm_all_reduce(PyObject *op, PyObject *args)
{
    return collective(op, args, "KKniiK:all_reduce", mlu_nccl_comm_all_reduce);
}

/* broadcast(send, recv, count, dtype, root, stream) */
static PyObject *comm_broadcast(PyObject *op, PyObject *args)
{
    return collective(op, args, "KKniiK:broadcast", mlu_nccl_comm_broadcast);
}

/* reduce_scatter(send, recv, recvcount, dtype, op, stream) */
static PyObject *comm_reduce_scatter(PyObject *op, PyObject *args)
{
    return collective(op, args, "KKniiK:reduce_scatter", mlu_nccl_comm_reduce_scatter);
}

/* all_gather(send, recv, sendcount, dtype, stream) */
static PyObject *comm_all_gather(PyObject *op, PyObject *args)
{
    mlu_nccl_comm *comm = ((CommObject *)op)->comm;
    unsigned long long send, recv, stream;
    Py_ssize_t count;
    int dtype;
    mlu_error err;
    mlu_status st;

    if (!PyArg_ParseTuple(args, "KKniK:all_gather", &send, &recv, &count, &dtype, &stream) || check_count(count) < 0)
        return NULL;
    mlu_error_clear(&err);
    Py_BEGIN_ALLOW_THREADS
    st = mlu_nccl_comm_all_gather(comm, PTR(send), PTR(recv), (size_t)count, dtype, PTR(stream), &err);
    Py_END_ALLOW_THREADS
    return call_result(op, st, &err);
}

/* send(buf, count, dtype, peer, stream) or, when not `sending`,
 * recv(buf, count, dtype, peer, stream), as fmt names it. */
static PyObject *point_to_point(PyObject *op, PyObject *args, const char *fmt, int sending)
{
    mlu_nccl_comm *comm = ((CommObject *)op)->comm;
    unsigned long long buf, stream;
    Py_ssize_t count;
    int dtype, peer;
    mlu_error err;
    mlu_status st;

    if (!PyArg_ParseTuple(args, fmt, &buf, &count, &dtype, &peer, &stream) || check_count(count) < 0)
        return NULL;
    mlu_error_clear(&err);
    Py_BEGIN_ALLOW_THREADS
    if (sending)
        st = mlu_nccl_comm_send(comm, PTR(buf), (size_t)count, dtype, peer, PTR(stream), &err);
    else
        st = mlu_nccl_comm_recv(comm, PTR(buf), (size_t)count, dtype, peer, PTR(stream), &err);
    Py_END_ALLOW_THREADS
    return call_result(op, st, &err);
}

static PyObject *comm_send(PyObject *op, PyObject *args)
{
    return point_to_point(op, args, "KniiK:send", 1);
}

static PyObject *comm_recv(PyObject *op, PyObject *args)
{
    return point_to_point(op, args, "KniiK:recv", 0);
}

/* The calls without arguments: group_start, group_end, abort, destroy. */
static PyObject *no_args_call(PyObject *op, mlu_status (*fn)(mlu_nccl_comm *c, mlu_error *err))
{
    mlu_nccl_comm *comm = ((CommObject *)op)->comm;
    mlu_error err;
    mlu_status st;

    mlu_error_clear(&err);
    Py_BEGIN_ALLOW_THREADS
    st = fn(comm, &err);
    Py_END_ALLOW_THREADS
    return call_result(op, st, &err);
}

static PyObject *comm_group_start(PyObject *op, PyObject *unused)
{
    (void)unused;
    return no_args_call(op, mlu_nccl_comm_group_start);
}

static PyObject *comm_group_end(PyObject *op, PyObject *unused)
{
    (void)unused;
    return no_args_call(op, mlu_nccl_comm_group_end);
}

static PyObject *comm_abort(PyObject *op, PyObject *unused)
{
    (void)unused;
    return no_args_call(op, mlu_nccl_comm_abort);
}

static PyObject *comm_destroy(PyObject *op, PyObject *unused)
{
    (void)unused;
    return no_args_call(op, mlu_nccl_comm_destroy);
}

/* async_error() -> (code, text): ncclCommGetAsyncError, 0 when none. */
static PyObject *comm_async_error(PyObject *op, PyObject *unused)
{
    CommObject *self = (CommObject *)op;
    int result = 0;
    const char *text = "";
    mlu_error err;
    mlu_status st;

    (void)unused;
    mlu_error_clear(&err);
    st = mlu_nccl_comm_async_error(self->comm, &result, &err);
    if (st != MLU_OK)
        return comm_raise(op, &err);
    if (result != MLU_NCCL_SUCCESS && result != MLU_NCCL_IN_PROGRESS) {
        mlu_error_clear(&err);
        (void)mlu_nccl_fail(&nccl_lib, NULL, "the communicator", result, &err);
        text = err.text;
    }
    return Py_BuildValue("(is)", result, text);
}

static PyObject *comm_get(PyObject *op, void *which)
{
    CommObject *self = (CommObject *)op;

    switch ((int)(intptr_t)which) {
    case 0:
        return PyLong_FromLong(mlu_nccl_comm_rank(self->comm));
    case 1:
        return PyLong_FromLong(mlu_nccl_comm_size(self->comm));
    case 2:
        return PyBool_FromLong(mlu_nccl_comm_closed(self->comm));
    default:
        return PyBool_FromLong(mlu_nccl_comm_timed_out(self->comm));
    }
}

static PyGetSetDef comm_getset[] = {
    {"rank", comm_get, NULL, "this rank", (void *)0},
    {"size", comm_get, NULL, "ranks in the communicator", (void *)1},
    {"closed", comm_get, NULL, "True once aborted or destroyed", (void *)2},
    {"timed_out", comm_get, NULL, "True when a timeout aborted it", (void *)3},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef comm_methods[] = {
    {"all_reduce", comm_all_reduce, METH_VARARGS,
     "all_reduce(send, recv, count, dtype, op, stream): ncclAllReduce."},
    {"broadcast", comm_broadcast, METH_VARARGS,
     "broadcast(send, recv, count, dtype, root, stream): ncclBroadcast."},
    {"all_gather", comm_all_gather, METH_VARARGS,
     "all_gather(send, recv, sendcount, dtype, stream): ncclAllGather."},
    {"reduce_scatter", comm_reduce_scatter, METH_VARARGS,
     "reduce_scatter(send, recv, recvcount, dtype, op, stream): ncclReduceScatter."},
    {"send", comm_send, METH_VARARGS, "send(buf, count, dtype, peer, stream): ncclSend."},
    {"recv", comm_recv, METH_VARARGS, "recv(buf, count, dtype, peer, stream): ncclRecv."},
    {"group_start", comm_group_start, METH_NOARGS, "ncclGroupStart."},
    {"group_end", comm_group_end, METH_NOARGS, "ncclGroupEnd."},
    {"async_error", comm_async_error, METH_NOARGS,
     "async_error() -> (code, text): ncclCommGetAsyncError."},
    {"abort", comm_abort, METH_NOARGS, "abort(): ncclCommAbort (again: nothing)."},
    {"destroy", comm_destroy, METH_NOARGS, "destroy(): ncclCommDestroy (again: nothing)."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot comm_slots[] = {
    {Py_tp_dealloc, comm_dealloc},
    {Py_tp_methods, comm_methods},
    {Py_tp_getset, comm_getset},
    {Py_tp_doc, "An NCCL communicator (made by nccl_comm_init)."},
    {0, NULL},
};

static PyType_Spec comm_spec = {
    .name = "mlutils._core.NcclComm",
    .basicsize = sizeof(CommObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = comm_slots,
};

/* Adds module attribute `attr`: the dict {names[i]: i for i < n}, in value order. */
static int add_codes(PyObject *m, const char *attr, const char *const *names, int n)
{
    PyObject *d = PyDict_New(), *code = NULL; /* new refs */
    int i, rc = -1;

    if (d == NULL)
        goto done;
    for (i = 0; i < n; i++) {
        code = PyLong_FromLong(i);
        if (code == NULL || PyDict_SetItemString(d, names[i], code) < 0)
            goto done;
        Py_CLEAR(code);
    }
    rc = PyModule_AddObjectRef(m, attr, d);
done:
    Py_XDECREF(code);
    Py_XDECREF(d);
    return rc;
}

int mlu_nccl_module_init(PyObject *m)
{
    static PyMethodDef methods[] = {
        {"nccl_load", py_nccl_load, METH_VARARGS,
         "nccl_load(dirs=()) -> NcclLibrary(path, version): load libnccl.so.2 (ImportError naming every "
         "place tried)."},
        {"nccl_loaded", py_nccl_loaded, METH_NOARGS, "nccl_loaded() -> NcclLibrary(path, version) or None."},
        {"_nccl_unload", py_nccl_unload, METH_NOARGS, "_nccl_unload(): forget the library (tests)."},
        {"nccl_unique_id", py_nccl_unique_id, METH_NOARGS,
         "nccl_unique_id() -> bytes: ncclGetUniqueId (128 bytes)."},
        {"nccl_dtype_supported", py_nccl_dtype_supported, METH_O,
         "nccl_dtype_supported(dtype) -> bool for the loaded NCCL."},
        {"nccl_comm_init", py_nccl_comm_init, METH_VARARGS,
         "nccl_comm_init(nranks, unique_id, rank, timeout=0.0) -> NcclComm."},
        {NULL, NULL, 0, NULL},
    };
    mlu_state *st = mlu_get_state(m);

    if (PyModule_AddFunctions(m, methods) < 0)
        return -1;
    if (mlu_add_struct_type(m, &library_desc, &st->nccl_library_type) < 0)
        return -1;
    if (add_codes(m, "nccl_dtypes", mlu_nccl_dtype_names, MLU_NCCL_DTYPE_COUNT) < 0 ||
        add_codes(m, "nccl_ops", mlu_nccl_op_names, MLU_NCCL_OP_COUNT) < 0)
        return -1;
    return mlu_add_heap_type(m, &comm_spec, &st->nccl_comm_type);
}
