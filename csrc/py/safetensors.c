/* safetensors.c: the Python face of safetensors reading and writing.
 *
 *   st_open(path) -> SafetensorsMap        the file mapped privately, header validated
 *   st_from_bytes(data) -> SafetensorsMap  a private copy of bytes, header validated
 *   SafetensorsMap.metadata() / .entries() / .array(index, dtype, copy_unaligned=False, check=True)
 *   SafetensorsMap.read(index, start, stop) / .check() / .error(text) / .close()
 *
 * Every error a map raises after the open names its file ("'path': text",
 * errors.c) when it was opened from a path.
 *   st_serialize(entries, metadata, path=None) -> bytes | None
 *   safetensors_dtypes() -> tuple of SafetensorsDtype rows
 *
 * Arrays made by .array() point into the mapping and hold a reference to the
 * SafetensorsMap, which unmaps when the last of them (and itself) goes.
 *
 * A file cut by another process must not crash the reader (pages past its
 * new end raise SIGBUS): the header is read with pread, copies are read with
 * pread, and before an array views the mapping the file is checked to still
 * have every byte it had when opened (core/file.h); a file that shrank is a
 * SafetensorsError.  The descriptor stays open for that until close(). */
#include "npy.h"

#include <string.h>

#include "../core/alloc.h"
#include "../core/atomicfile.h"
#include "../core/file.h"
#include "../core/safetensors.h"
#include "../core/torch_dtypes.h"

/* An array of the most dimensions the core lets through must be one NumPy can make. */
_Static_assert(MLU_ST_MAX_NDIM <= NPY_MAXDIMS, "MLU_ST_MAX_NDIM exceeds NumPy's NPY_MAXDIMS");

#include <unistd.h>

typedef struct {
    PyObject_HEAD
    mlu_file_map map;   /* owned: the file's private mapping, or a private copy of bytes */
    int fd;             /* owned: the file, until close(); -1 for bytes or once closed */
    uint64_t file_size; /* the file's size when opened (map.size) */
    mlu_st_header hdr;  /* owned */
    int closed;         /* close() was called: no more arrays or reads */
    int readers;        /* reads running without the GIL: the last one closes fd after close() */
    PyObject *path;     /* owned: os.fspath of the path opened (str or bytes); NULL for bytes */
} StMap;

/* 0 when the mapping may be read or viewed: a map of bytes always, a file's
 * while it is open and still has every byte it had when opened (a page past
 * a shrunken end would raise SIGBUS when touched).  Else -1, an exception set. */
static int stmap_check(StMap *m, mlu_state *st)
{
    mlu_error err;

    if (m->closed) {
        mlu_raise_about(st->SafetensorsError, m->path, "the file is closed");
        return -1;
    }
    if (m->fd < 0)
        return 0;
    mlu_error_clear(&err);
    if (mlu_file_check_size(m->fd, m->file_size, &err) != MLU_OK) {
        mlu_raise(st, &err, MLU_DOMAIN_SAFETENSORS, m->path);
        return -1;
    }
    return 0;
}

/* Closes the file once no read is running without the GIL (close() and
 * the last such read call it). */
static void stmap_close_fd(StMap *m)
{
    if (m->readers == 0 && m->fd >= 0) {
        close(m->fd);
        m->fd = -1;
    }
}

/* Copies n bytes at file offset off into dst: with pread from a file (one
 * that shrank is a SafetensorsError, not SIGBUS), from memory for bytes.
 * Releases the GIL.  0, or -1 with an exception set. */
static int stmap_copy(StMap *m, mlu_state *st, uint64_t off, void *dst, size_t n)
{
    mlu_error err;
    mlu_status rc = MLU_OK;
    int fd = m->fd;

    if (m->closed) {
        mlu_raise_about(st->SafetensorsError, m->path, "the file is closed");
        return -1;
    }
    if (n == 0)
        return 0;
    mlu_error_clear(&err);
    /* another thread may close() meanwhile: the descriptor stays open (and
     * its number cannot be reused by another file) until this read is done */
    m->readers++;
    Py_BEGIN_ALLOW_THREADS
    if (fd >= 0)
        rc = mlu_file_read_at(fd, off, dst, n, "tensor data", &err);
    else
        memcpy(dst, m->map.data + off, n);
    Py_END_ALLOW_THREADS
    m->readers--;
    if (m->closed)
        stmap_close_fd(m);
    if (rc != MLU_OK) {
        mlu_raise(st, &err, MLU_DOMAIN_SAFETENSORS, m->path);
        return -1;
    }
    return 0;
}

/* GC support: the only reference an instance holds is to its (heap) type. */
static int stmap_traverse(PyObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    return 0;
}

static void stmap_dealloc(PyObject *self)
{
    StMap *m = (StMap *)self;
    PyTypeObject *tp = Py_TYPE(self);

    PyObject_GC_UnTrack(self);
    mlu_st_header_free(&m->hdr);
    mlu_file_map_close(&m->map);
    if (m->fd >= 0)
        close(m->fd);
    m->fd = -1;
    Py_CLEAR(m->path);
    tp->tp_free(self);
    Py_DECREF(tp);
}

/* A new, empty StMap (new ref). */
static StMap *stmap_new(PyObject *module)
{
    mlu_state *st = mlu_get_state(module);
    PyTypeObject *tp = (PyTypeObject *)st->safetensors_map_type;
    StMap *m = (StMap *)tp->tp_alloc(tp, 0);

    if (m != NULL) {
        m->map.data = NULL;
        m->map.size = 0;
        m->fd = -1;
        m->file_size = 0;
        m->closed = 0;
        m->readers = 0;
        m->path = NULL;
        memset(&m->hdr, 0, sizeof(m->hdr));
    }
    return m;
}

/* New ref: m, which it steals, when rc (the status of filling it) is
 * MLU_OK; else NULL with err raised as a SafetensorsError about subject
 * (borrowed, may be NULL) and m released. */
static PyObject *stmap_filled_steal(PyObject *module, StMap *m, mlu_status rc, const mlu_error *err,
                                    PyObject *subject)
{
    PyObject *res = (PyObject *)m;

    if (rc != MLU_OK) {
        mlu_raise(mlu_get_state(module), err, MLU_DOMAIN_SAFETENSORS, subject);
        Py_CLEAR(res);
    }
    return res;
}

/* st_open(path) -> SafetensorsMap */
static PyObject *py_st_open(PyObject *module, PyObject *arg)
{
    PyObject *path = NULL;
    StMap *m = NULL;
    PyObject *res = NULL;
    mlu_error err;
    mlu_status rc;

    if (!PyUnicode_FSConverter(arg, &path))
        goto done;
    m = stmap_new(module);
    if (m == NULL)
        goto done;
    m->path = PyOS_FSPath(arg); /* new ref: str or bytes, for the map's errors */
    if (m->path == NULL)
        goto done;
    mlu_error_clear(&err);
    Py_BEGIN_ALLOW_THREADS
    rc = mlu_file_open_ro(PyBytes_AS_STRING(path), &m->fd, &m->file_size, &err);
    if (rc == MLU_OK)
        rc = mlu_st_read_header(m->fd, m->file_size, &m->hdr, &err);
    if (rc == MLU_OK)
        rc = mlu_file_map_fd(&m->map, m->fd, m->file_size, &err);
    Py_END_ALLOW_THREADS
    res = stmap_filled_steal(module, m, rc, &err, arg);
    m = NULL;
done:
    Py_XDECREF(m);
    Py_XDECREF(path);
    return res;
}

/* st_from_bytes(data) -> SafetensorsMap over a private copy of data. */
static PyObject *py_st_from_bytes(PyObject *module, PyObject *arg)
{
    Py_buffer view;
    int have_view = 0;
    StMap *m = NULL;
    PyObject *res = NULL;
    mlu_error err;
    mlu_status rc;

    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        goto done;
    have_view = 1;
    m = stmap_new(module);
    if (m == NULL)
        goto done;
    mlu_error_clear(&err);
    /* Validate first (no copy of a bad input), then copy; pure C on memory
     * the view pins (its size cannot change), so without the GIL. */
    Py_BEGIN_ALLOW_THREADS
    rc = mlu_st_parse(view.buf, (uint64_t)view.len, &m->hdr, &err);
    if (rc == MLU_OK) {
        rc = mlu_file_map_anon(&m->map, (size_t)view.len, &err);
        if (rc == MLU_OK) {
            m->file_size = (uint64_t)view.len;
            memcpy(m->map.data, view.buf, m->map.size);
        }
    }
    Py_END_ALLOW_THREADS
    res = stmap_filled_steal(module, m, rc, &err, NULL);
    m = NULL;
done:
    Py_XDECREF(m);
    if (have_view)
        PyBuffer_Release(&view);
    return res;
}

/* metadata() -> dict[str, str] | None */
static PyObject *stmap_metadata(PyObject *self, PyObject *unused)
{
    StMap *m = (StMap *)self;
    PyObject *d = NULL, *k = NULL, *v = NULL;
    size_t i;

    (void)unused;
    if (!m->hdr.has_metadata)
        Py_RETURN_NONE;
    d = PyDict_New();
    if (d == NULL)
        goto error;
    for (i = 0; i < m->hdr.nmeta; i++) {
        const mlu_st_meta *e = &m->hdr.meta[i];
        k = PyUnicode_DecodeUTF8(e->key, (Py_ssize_t)e->key_len, "strict");
        v = PyUnicode_DecodeUTF8(e->value, (Py_ssize_t)e->value_len, "strict");
        if (k == NULL || v == NULL || PyDict_SetItem(d, k, v) < 0)
            goto error;
        Py_CLEAR(k);
        Py_CLEAR(v);
    }
    return d;
error:
    Py_XDECREF(k);
    Py_XDECREF(v);
    Py_XDECREF(d);
    return NULL;
}

/* One tensor of a header, as Python sees it: fields by name (also a tuple,
 * so unpacking works).  The one definition of this contract. */
enum { ENTRY_NAME, ENTRY_DTYPE, ENTRY_SHAPE, ENTRY_BEGIN, ENTRY_END, ENTRY_NFIELDS };
static PyStructSequence_Field entry_fields[ENTRY_NFIELDS + 1] = {
    [ENTRY_NAME] = {"name", "the tensor's name"},
    [ENTRY_DTYPE] = {"dtype", "its safetensors dtype name (\"F32\", \"BF16\", ...)"},
    [ENTRY_SHAPE] = {"shape", "tuple of dimensions"},
    [ENTRY_BEGIN] = {"begin", "first byte in the data section"},
    [ENTRY_END] = {"end", "end byte (exclusive) in the data section"},
    [ENTRY_NFIELDS] = {NULL, NULL},
};
static PyStructSequence_Desc entry_desc = {
    "mlutils._core.SafetensorsEntry",
    "One tensor of a validated safetensors header: name, dtype, shape, begin, end.",
    entry_fields,
    ENTRY_NFIELDS,
};

/* entries() -> list of SafetensorsEntry, in offset order. */
static PyObject *stmap_entries(PyObject *self, PyObject *unused)
{
    StMap *m = (StMap *)self;
    mlu_state *st = mlu_state_from_type(Py_TYPE(self)); /* borrowed */
    PyObject *list = NULL, *shape = NULL, *item = NULL, *v;
    size_t i, k;

    (void)unused;
    if (st == NULL)
        goto error;
    list = PyList_New((Py_ssize_t)m->hdr.ntensors);
    if (list == NULL)
        goto error;
    for (i = 0; i < m->hdr.ntensors; i++) {
        const mlu_st_tensor *t = &m->hdr.tensors[i];
        shape = PyTuple_New((Py_ssize_t)t->ndim);
        if (shape == NULL)
            goto error;
        for (k = 0; k < t->ndim; k++) {
            PyObject *d = PyLong_FromUnsignedLongLong(t->shape[k]);
            if (d == NULL)
                goto error;
            PyTuple_SET_ITEM(shape, (Py_ssize_t)k, d); /* steals d */
        }
        item = PyStructSequence_New((PyTypeObject *)st->safetensors_entry_type);
        if (item == NULL)
            goto error;
        PyStructSequence_SET_ITEM(item, ENTRY_SHAPE, shape); /* steals shape */
        shape = NULL;
#define SET(field, expr)                                   \
        if ((v = (expr)) == NULL)                          \
            goto error;                                    \
        PyStructSequence_SET_ITEM(item, field, v) /* steals v */
        SET(ENTRY_NAME, PyUnicode_DecodeUTF8(t->name, (Py_ssize_t)t->name_len, "strict"));
        SET(ENTRY_DTYPE, PyUnicode_FromString(mlu_st_dtype_name(t->dtype)));
        SET(ENTRY_BEGIN, PyLong_FromUnsignedLongLong((unsigned long long)t->begin));
        SET(ENTRY_END, PyLong_FromUnsignedLongLong((unsigned long long)t->end));
#undef SET
        PyList_SET_ITEM(list, (Py_ssize_t)i, item); /* steals item */
        item = NULL;
    }
    return list;
error:
    Py_XDECREF(shape);
    Py_XDECREF(item);
    Py_XDECREF(list);
    return NULL;
}

/* array(index, dtype, copy_unaligned=False, check=True) -> ndarray
 *
 * dtype: a NumPy dtype whose item size is the tensor's element size, or any
 * 1-byte dtype for the sub-byte types (F4, F6_*), whose shape becomes the
 * header's with the last dimension scaled by bits/8 when that is whole, else
 * one dimension of the packed byte count.  The array points into the mapping
 * (writable, copy-on-write) unless it is misaligned for dtype and
 * copy_unaligned is set, in which case it is a copy (read with pread).  A
 * view is made after checking the file has not shrunk, unless check is
 * false (the caller called check() itself, once for many arrays). */
static PyObject *stmap_array(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"index", "dtype", "copy_unaligned", "check", NULL};
    StMap *m = (StMap *)self;
    mlu_state *st = mlu_state_from_type(Py_TYPE(self));
    Py_ssize_t index;
    PyArray_Descr *descr = NULL;
    int copy_unaligned = 0, check = 1, nd, aligned, k;
    npy_intp dims[MLU_ST_MAX_NDIM];
    uint64_t shape[MLU_ST_MAX_NDIM];
    size_t nshape;
    const mlu_st_tensor *t;
    unsigned bits, elbytes;
    npy_intp elsize, align;
    uint8_t *ptr;
    uint64_t nbytes;
    mlu_error err;
    PyObject *arr = NULL;

    if (st == NULL || !PyArg_ParseTupleAndKeywords(args, kw, "nO&|pp:array", kwlist, &index,
                                                   PyArray_DescrConverter, &descr,
                                                   &copy_unaligned, &check))
        return NULL;
    /* from here descr is a new reference */
    if (index < 0 || (size_t)index >= m->hdr.ntensors) {
        mlu_raise_about(PyExc_IndexError, m->path, "tensor index out of range");
        goto error;
    }
    if (PyDataType_FLAGCHK(descr, NPY_ITEM_REFCOUNT)) {
        /* file bytes taken for object pointers would crash the reader */
        mlu_raise_about(PyExc_TypeError, m->path, "a tensor cannot be read as %R: it holds Python objects",
                        (PyObject *)descr);
        goto error;
    }
    t = &m->hdr.tensors[index];
    bits = mlu_st_dtype_bits(t->dtype);
    elsize = (npy_intp)PyDataType_ELSIZE(descr);
    /* the array's shape, or the refusal the writer would have made */
    mlu_error_clear(&err);
    if (mlu_st_array_shape(t->name, t->name_len, t->dtype, t->ndim, t->shape, shape, &nshape, &elbytes,
                           &nbytes, &err) != MLU_OK) {
        mlu_raise_about(st->SafetensorsError, m->path, "%s", err.text);
        goto error;
    }
    if (bits % 8 == 0) {
        if ((uint64_t)elsize * 8 != bits) {
            mlu_raise_about(PyExc_ValueError, m->path, "tensor '%s' is %s: a %u-byte dtype is needed, not %R",
                            t->name, mlu_st_dtype_name(t->dtype), bits / 8, (PyObject *)descr);
            goto error;
        }
    } else if (elsize != 1) {
        mlu_raise_about(PyExc_ValueError, m->path, "tensor '%s' is %s: a 1-byte dtype is needed, not %R",
                        t->name, mlu_st_dtype_name(t->dtype), (PyObject *)descr);
        goto error;
    }
    nd = (int)nshape;
    for (k = 0; k < nd; k++)
        dims[k] = (npy_intp)shape[k]; /* each at most 2^63-1 */
    ptr = m->map.data + m->hdr.data_start + t->begin;
    align = (npy_intp)PyDataType_ALIGNMENT(descr);
    aligned = align <= 1 || ((uintptr_t)ptr % (uintptr_t)align) == 0;
    if (!aligned && copy_unaligned) {
        /* a copy of our own, aligned by NumPy's allocator */
        arr = PyArray_NewFromDescr(&PyArray_Type, descr, nd, dims, NULL, NULL, 0, NULL);
        descr = NULL; /* stolen */
        if (arr == NULL)
            goto error;
        if (stmap_copy(m, st, m->hdr.data_start + t->begin, PyArray_DATA((PyArrayObject *)arr),
                       (size_t)nbytes) < 0)
            goto error;
        goto done;
    }
    if (m->closed) {
        mlu_raise_about(st->SafetensorsError, m->path, "the file is closed");
        goto error;
    }
    if (check && stmap_check(m, st) < 0)
        goto error;
    /* zero-copy; NumPy handles an array whose ALIGNED flag is clear */
    arr = PyArray_NewFromDescr(&PyArray_Type, descr, nd, dims, NULL, ptr,
                               NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_WRITEABLE |
                                   (aligned ? NPY_ARRAY_ALIGNED : 0),
                               NULL);
    descr = NULL; /* stolen */
    if (arr == NULL)
        goto error;
    Py_INCREF(self);
    if (PyArray_SetBaseObject((PyArrayObject *)arr, self) < 0) /* steals self, even on failure */
        goto error;
    goto done;
error:
    Py_XDECREF(descr);
    Py_CLEAR(arr);
done:
    return arr;
}

/* read(index, start, stop) -> a new uint8 ndarray of bytes [start, stop) of
 * tensor `index`'s data, read with pread (get_slice's reads). */
static PyObject *stmap_read(PyObject *self, PyObject *args)
{
    StMap *m = (StMap *)self;
    mlu_state *st = mlu_state_from_type(Py_TYPE(self));
    Py_ssize_t index, start, stop;
    const mlu_st_tensor *t;
    npy_intp dim;
    PyObject *arr = NULL;

    if (st == NULL || !PyArg_ParseTuple(args, "nnn:read", &index, &start, &stop))
        goto error;
    if (index < 0 || (size_t)index >= m->hdr.ntensors) {
        mlu_raise_about(PyExc_IndexError, m->path, "tensor index out of range");
        goto error;
    }
    t = &m->hdr.tensors[index];
    if (start < 0 || stop < start || (uint64_t)stop > t->end - t->begin) {
        mlu_raise_about(PyExc_ValueError, m->path, "read: bytes [%zd, %zd) are not within tensor '%s' (%llu bytes)",
                        start, stop, t->name, (unsigned long long)(t->end - t->begin));
        goto error;
    }
    dim = (npy_intp)(stop - start);
    arr = PyArray_SimpleNew(1, &dim, NPY_UINT8);
    if (arr == NULL)
        goto error;
    if (stmap_copy(m, st, m->hdr.data_start + t->begin + (uint64_t)start, PyArray_DATA((PyArrayObject *)arr),
                   (size_t)dim) < 0)
        goto error;
    goto done;
error:
    Py_CLEAR(arr);
done:
    return arr;
}

/* check(): raises SafetensorsError when the file has shrunk since it was
 * opened (or is closed): then views of the mapping must not be made. */
static PyObject *stmap_check_py(PyObject *self, PyObject *unused)
{
    mlu_state *st = mlu_state_from_type(Py_TYPE(self));

    (void)unused;
    if (st == NULL || stmap_check((StMap *)self, st) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* error(text) -> SafetensorsError(text) naming the map's file as its own
 * errors do, returned (not raised): for the errors the Python wrapper
 * raises about an open map. */
static PyObject *stmap_error(PyObject *self, PyObject *text)
{
    mlu_state *st = mlu_state_from_type(Py_TYPE(self)); /* borrowed */
    PyObject *res = NULL;

    if (st == NULL)
        goto done;
    if (!PyUnicode_Check(text)) {
        PyErr_Format(PyExc_TypeError, "error: text must be a str, not %.100s", Py_TYPE(text)->tp_name);
        goto done;
    }
    mlu_raise_about(st->SafetensorsError, ((StMap *)self)->path, "%U", text);
    res = mlu_take_raised(); /* new ref */
    if (res != NULL && !PyObject_TypeCheck(res, (PyTypeObject *)st->SafetensorsError)) {
        mlu_restore_raised(res); /* the error making it (MemoryError, ...) */
        res = NULL;
    }
done:
    return res;
}

/* close(): closes the file; arrays already made stay valid (they keep the
 * mapping), new ones and reads raise SafetensorsError. */
static PyObject *stmap_close(PyObject *self, PyObject *unused)
{
    StMap *m = (StMap *)self;

    (void)unused;
    m->closed = 1;
    stmap_close_fd(m);
    Py_RETURN_NONE;
}

static PyObject *stmap_get_size(PyObject *self, void *closure)
{
    (void)closure;
    return PyLong_FromUnsignedLongLong(((StMap *)self)->file_size);
}

static PyObject *stmap_get_data_start(PyObject *self, void *closure)
{
    (void)closure;
    return PyLong_FromUnsignedLongLong(((StMap *)self)->hdr.data_start);
}

static PyMethodDef stmap_methods[] = {
    {"metadata", stmap_metadata, METH_NOARGS,
     "metadata() -> dict[str, str] | None: the header's __metadata__."},
    {"entries", stmap_entries, METH_NOARGS,
     "entries() -> list[SafetensorsEntry (name, dtype, shape, begin, end)] in offset order."},
    {"array", (PyCFunction)(void (*)(void))stmap_array, METH_VARARGS | METH_KEYWORDS,
     "array(index, dtype, copy_unaligned=False, check=True) -> ndarray over the mapped bytes."},
    {"check", stmap_check_py, METH_NOARGS,
     "check() -> None: SafetensorsError if the file has shrunk since it was opened."},
    {"read", stmap_read, METH_VARARGS,
     "read(index, start, stop) -> uint8 ndarray: bytes [start, stop) of a tensor, read from the file."},
    {"error", stmap_error, METH_O,
     "error(text) -> SafetensorsError naming the file (\"'path': text\"), not raised."},
    {"close", stmap_close, METH_NOARGS,
     "close() -> None: close the file; arrays already made stay valid."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef stmap_getset[] = {
    {"size", stmap_get_size, NULL, "file size in bytes", NULL},
    {"data_start", stmap_get_data_start, NULL, "file offset of the data buffer", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot stmap_slots[] = {
    {Py_tp_dealloc, (void *)stmap_dealloc},
    {Py_tp_traverse, (void *)stmap_traverse},
    {Py_tp_methods, stmap_methods},
    {Py_tp_getset, stmap_getset},
    {Py_tp_doc, (void *)"A validated safetensors file mapped privately; arrays keep it alive."},
    {0, NULL},
};

static PyType_Spec stmap_spec = {
    .name = "mlutils._core.SafetensorsMap",
    .basicsize = sizeof(StMap),
    .itemsize = 0,
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_DISALLOW_INSTANTIATION | Py_TPFLAGS_HAVE_GC |
             Py_TPFLAGS_IMMUTABLETYPE,
    .slots = stmap_slots,
};

/* ------------------------------------------------------------------ writing */

typedef struct {
    size_t n;
    mlu_st_entry *entries;  /* owned (mlu_free) */
    uint64_t *dims;         /* owned: every entry's shape, back to back */
    Py_buffer *views;       /* owned (PyMem_Free); nviews of them held */
    size_t nviews;
    size_t nmeta;
    mlu_st_kv *meta;        /* owned (mlu_free) */
    PyObject *fields;       /* owned list: per entry (name, dtype, shape, data), read by attribute */
} ser_job;

static void ser_job_release(ser_job *j)
{
    size_t i;

    for (i = 0; i < j->nviews; i++)
        PyBuffer_Release(&j->views[i]);
    PyMem_Free(j->views);
    mlu_free(j->entries);
    mlu_free(j->dims);
    mlu_free(j->meta);
    Py_XDECREF(j->fields);
    memset(j, 0, sizeof(*j));
}

/* The attributes st_serialize reads from each entry (mlutils._safetensors._Entry),
 * kept in j->fields in this order. */
static const char *const entry_attrs[4] = {"name", "dtype", "shape", "data"};

/* Fills j from the sequence `seq` of entries: objects with name, dtype,
 * shape (a tuple) and data (a buffer) attributes. */
static int ser_collect(ser_job *j, PyObject *seq)
{
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq), i, k;
    size_t total_dims = 0, d = 0;
    PyObject *shape, *got[4] = {NULL, NULL, NULL, NULL}, *item = NULL;
    int a;

    j->n = (size_t)n;
    j->fields = PyList_New(0);
    if (j->fields == NULL)
        return -1;
    for (i = 0; i < n; i++) {
        PyObject *entry = PySequence_Fast_GET_ITEM(seq, i); /* borrowed */
        for (a = 0; a < 4; a++) {
            got[a] = PyObject_GetAttrString(entry, entry_attrs[a]); /* new ref */
            if (got[a] == NULL)
                break;
        }
        if (a == 4 && PyTuple_Check(got[2]))
            item = PyTuple_Pack(4, got[0], got[1], got[2], got[3]);
        else if (a == 4 || PyErr_ExceptionMatches(PyExc_AttributeError)) {
            PyErr_Clear();
            PyErr_SetString(PyExc_TypeError, "entries must have name, dtype, shape (a tuple) and data (a buffer)");
        }
        for (a = 0; a < 4; a++)
            Py_CLEAR(got[a]);
        if (item == NULL || PyList_Append(j->fields, item) < 0) {
            Py_XDECREF(item);
            return -1;
        }
        Py_CLEAR(item);
        total_dims += (size_t)PyTuple_GET_SIZE(PyTuple_GET_ITEM(PyList_GET_ITEM(j->fields, i), 2));
    }
    j->entries = mlu_calloc(j->n, sizeof(mlu_st_entry));
    j->dims = mlu_calloc(total_dims, sizeof(uint64_t));
    j->views = PyMem_Calloc(j->n ? j->n : 1, sizeof(Py_buffer));
    if (j->entries == NULL || j->dims == NULL || j->views == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (i = 0; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(j->fields, i); /* borrowed: (name, dtype, shape, data) */
        mlu_st_entry *e = &j->entries[i];
        Py_ssize_t len;
        const char *s;
        s = PyUnicode_Check(PyTuple_GET_ITEM(item, 0))
                ? PyUnicode_AsUTF8AndSize(PyTuple_GET_ITEM(item, 0), &len) : NULL;
        if (s == NULL) {
            if (!PyErr_Occurred())
                PyErr_Format(PyExc_TypeError, "tensor names must be str, not %.100s",
                             Py_TYPE(PyTuple_GET_ITEM(item, 0))->tp_name);
            return -1;
        }
        e->name = s;
        e->name_len = (size_t)len;
        s = PyUnicode_Check(PyTuple_GET_ITEM(item, 1))
                ? PyUnicode_AsUTF8AndSize(PyTuple_GET_ITEM(item, 1), &len) : NULL;
        if (s == NULL || (e->dtype = mlu_st_dtype_from_name(s, (size_t)len)) < 0) {
            if (!PyErr_Occurred())
                PyErr_Format(PyExc_ValueError, "tensor '%U': unknown dtype %R",
                             PyTuple_GET_ITEM(item, 0), PyTuple_GET_ITEM(item, 1));
            return -1;
        }
        shape = PyTuple_GET_ITEM(item, 2);
        e->ndim = (size_t)PyTuple_GET_SIZE(shape);
        e->shape = j->dims + d;
        for (k = 0; k < PyTuple_GET_SIZE(shape); k++) {
            unsigned long long v = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(shape, k));
            if (v == (unsigned long long)-1 && PyErr_Occurred())
                return -1;
            j->dims[d++] = v;
        }
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(item, 3), &j->views[i], PyBUF_C_CONTIGUOUS) < 0)
            return -1;
        j->nviews++;
        e->data = j->views[i].buf;
        e->nbytes = (uint64_t)j->views[i].len;
    }
    return 0;
}

static int ser_metadata(ser_job *j, PyObject *meta)
{
    Py_ssize_t pos = 0, len;
    PyObject *k, *v;
    size_t i = 0;

    j->nmeta = (size_t)PyDict_GET_SIZE(meta);
    j->meta = mlu_calloc(j->nmeta, sizeof(mlu_st_kv));
    if (j->meta == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    while (PyDict_Next(meta, &pos, &k, &v)) { /* borrowed k, v */
        if (!PyUnicode_Check(k) || !PyUnicode_Check(v)) {
            PyErr_Format(PyExc_TypeError, "metadata must map str to str: key %R has a %.100s value",
                         k, Py_TYPE(v)->tp_name);
            return -1;
        }
        if ((j->meta[i].key = PyUnicode_AsUTF8AndSize(k, &len)) == NULL)
            return -1;
        j->meta[i].key_len = (size_t)len;
        if ((j->meta[i].value = PyUnicode_AsUTF8AndSize(v, &len)) == NULL)
            return -1;
        j->meta[i].value_len = (size_t)len;
        i++;
    }
    return 0;
}

/* st_serialize(entries, metadata, path=None, *, durable=True) -> bytes (no
 * path) or None; durable: the file is fsynced (atomicfile.h). */
static PyObject *py_st_serialize(PyObject *module, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"entries", "metadata", "path", "durable", NULL};
    PyObject *entries, *meta, *pathobj = Py_None, *path = NULL, *seq = NULL, *res = NULL;
    PyObject *durable = Py_True; /* borrowed */
    ser_job j;
    mlu_buf hdr = MLU_BUF_INIT;
    uint64_t data_len = 0, total;
    mlu_error err;
    mlu_status rc;
    size_t i;

    memset(&j, 0, sizeof(j));
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|O$O!:st_serialize", kwlist, &entries, &meta,
                                     &pathobj, &PyBool_Type, &durable))
        return NULL;
    if (meta != Py_None && !PyDict_Check(meta)) {
        PyErr_Format(PyExc_TypeError, "metadata must be a dict or None, not %.100s",
                     Py_TYPE(meta)->tp_name);
        goto error;
    }
    if (pathobj != Py_None && !PyUnicode_FSConverter(pathobj, &path))
        goto error;
    seq = PySequence_Fast(entries, "entries must be a sequence"); /* new ref */
    if (seq == NULL || ser_collect(&j, seq) < 0)
        goto error;
    if (meta != Py_None && ser_metadata(&j, meta) < 0)
        goto error;
    mlu_error_clear(&err);
    rc = mlu_st_build_header(j.entries, j.n, j.meta, j.nmeta, meta != Py_None, &hdr, &data_len,
                             &err);
    if (rc != MLU_OK) {
        /* A tensor or header the format cannot hold is the format's error. */
        if (err.code == MLU_EINVAL)
            err.code = MLU_EFORMAT;
        mlu_raise(mlu_get_state(module), &err, MLU_DOMAIN_SAFETENSORS, NULL);
        goto error;
    }
    if (path != NULL) {
        Py_BEGIN_ALLOW_THREADS
        rc = mlu_st_write_file(PyBytes_AS_STRING(path), hdr.data, hdr.len, j.entries, j.n,
                               durable == Py_True ? MLU_AFILE_DURABLE : 0u, &err);
        Py_END_ALLOW_THREADS
        if (rc != MLU_OK) {
            mlu_raise_write(mlu_get_state(module), &err, MLU_DOMAIN_SAFETENSORS, pathobj);
            goto error;
        }
        res = Py_NewRef(Py_None);
    } else {
        char *out;
        if (mlu_add_overflow_u64(data_len, (uint64_t)hdr.len, &total) ||
            total > (uint64_t)PY_SSIZE_T_MAX) {
            PyErr_SetString(PyExc_OverflowError, "the tensors are too large for one bytes object");
            goto error;
        }
        res = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
        if (res == NULL)
            goto error;
        out = PyBytes_AS_STRING(res);
        Py_BEGIN_ALLOW_THREADS
        memcpy(out, hdr.data, hdr.len);
        out += hdr.len;
        for (i = 0; i < j.n; i++) {
            if (j.entries[i].nbytes > 0)
                memcpy(out, j.entries[i].data, (size_t)j.entries[i].nbytes);
            out += j.entries[i].nbytes;
        }
        Py_END_ALLOW_THREADS
    }
    goto done;
error:
    Py_CLEAR(res);
done:
    ser_job_release(&j);
    mlu_buf_free(&hdr);
    Py_XDECREF(seq);
    Py_XDECREF(path);
    return res;
}

/* One safetensors dtype as Python sees it: the format's facts
 * (mlu_st_dtypes) joined with the torch dtype table's row that names it. */
enum { SD_NAME, SD_BITS, SD_TORCH, SD_NUMPY, SD_ML_DTYPES, SD_NFIELDS };
static PyStructSequence_Field sd_fields[SD_NFIELDS + 1] = {
    [SD_NAME] = {"name", "the header's name (\"F32\")"},
    [SD_BITS] = {"bits", "bits per element (4 for F4, 6 for F6_*, else 8 x bytes)"},
    [SD_TORCH] = {"torch", "the torch dtype (torch.<torch>), or None when torch has none"},
    [SD_NUMPY] = {"numpy", "NumPy's little-endian dtype string, or None when NumPy has none"},
    [SD_ML_DTYPES] = {"ml_dtypes", "the ml_dtypes type of that name, or None"},
    [SD_NFIELDS] = {NULL, NULL},
};
static PyStructSequence_Desc sd_desc = {
    "mlutils._core.SafetensorsDtype",
    "One safetensors dtype: name, bits, and its torch, NumPy and ml_dtypes equivalents.",
    sd_fields,
    SD_NFIELDS,
};

/* New ref: a str, or None for NULL. */
static PyObject *str_or_none(const char *s)
{
    return s != NULL ? PyUnicode_FromString(s) : Py_NewRef(Py_None);
}

/* safetensors_dtypes() -> tuple of SafetensorsDtype in the format's
 * declaration order (new ref). */
static PyObject *py_safetensors_dtypes(PyObject *module, PyObject *unused)
{
    mlu_state *st = mlu_get_state(module); /* borrowed */
    PyObject *res = NULL, *out = NULL, *row, *v;
    int i;

    (void)unused;
    if (st == NULL || (res = PyTuple_New(MLU_ST_DTYPE_COUNT)) == NULL)
        goto done;
    for (i = 0; i < MLU_ST_DTYPE_COUNT; i++) {
        const mlu_st_dtype_info *d = &mlu_st_dtypes[i];
        int t = mlu_torch_dtype_of_safetensors(d->name);
        const mlu_torch_dtype *td = t >= 0 ? &mlu_torch_dtypes[t] : NULL;
        if ((row = PyStructSequence_New((PyTypeObject *)st->safetensors_dtype_type)) == NULL)
            goto done;
        PyTuple_SET_ITEM(res, i, row); /* steals row */
#define SET(field, expr)                                   \
        if ((v = (expr)) == NULL)                          \
            goto done;                                     \
        PyStructSequence_SET_ITEM(row, field, v) /* steals v */
        SET(SD_NAME, PyUnicode_FromString(d->name));
        SET(SD_BITS, PyLong_FromLong(d->bits));
        SET(SD_TORCH, str_or_none(td != NULL ? td->name : NULL));
        SET(SD_NUMPY, str_or_none(td != NULL ? td->numpy : NULL));
        SET(SD_ML_DTYPES, str_or_none(td != NULL ? td->ml_dtypes : NULL));
#undef SET
    }
    out = res;
    res = NULL;
done:
    Py_XDECREF(res);
    return out;
}

int mlu_safetensors_module_init(PyObject *m)
{
    static PyMethodDef methods[] = {
        {"st_open", py_st_open, METH_O,
         "st_open(path) -> SafetensorsMap: map the file privately and validate its header."},
        {"st_from_bytes", py_st_from_bytes, METH_O,
         "st_from_bytes(data) -> SafetensorsMap: validate, then copy data into private memory."},
        {"st_serialize", (PyCFunction)(void (*)(void))py_st_serialize,
         METH_VARARGS | METH_KEYWORDS,
         "st_serialize(entries, metadata, path=None) -> bytes | None: write safetensors "
         "(atomically to path, or to bytes); entries have name, dtype, shape and data (a buffer)."},
        {"safetensors_dtypes", py_safetensors_dtypes, METH_NOARGS,
         "safetensors_dtypes() -> tuple of SafetensorsDtype rows (name, bits, torch, numpy, ml_dtypes):\n"
         "the safetensors dtypes in the format's declaration order, from the one C table."},
        {NULL, NULL, 0, NULL},
    };
    mlu_state *st = mlu_get_state(m);

    if (mlu_add_heap_type(m, &stmap_spec, &st->safetensors_map_type) < 0 ||
        mlu_add_struct_type(m, &entry_desc, &st->safetensors_entry_type) < 0 ||
        mlu_add_struct_type(m, &sd_desc, &st->safetensors_dtype_type) < 0)
        return -1;
    return PyModule_AddFunctions(m, methods);
}
