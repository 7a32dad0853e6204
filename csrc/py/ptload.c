/* ptload.c: the Python face of PyTorch .pt loading.
 *
 * _pt_load(path, mode, hooks) opens the file, runs the core parser over it
 * with pread (core/ptload_file.c: zip or legacy, restricted pickle VM,
 * storage checks; no metadata is read through a mapping), makes one uint8
 * NumPy array per storage (in mode 0 a view of a private mapping of the file
 * when the record is stored and aligned, else a copy read with pread) and
 * converts the node tree to Python objects.  Torch-specific values go through `hooks`, an object
 * with tensor, dtype, size and device callables (read by name) supplied by mlutils/_ptload.py, so
 * this file never imports torch.  hooks.tensor and hooks.device take every argument by keyword
 * (their names are in one table each below); hooks.dtype and hooks.size take one value. */
#include "npy.h"

#include <errno.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../core/alloc.h"
#include "../core/ptload_file.h"

enum { MODE_MMAP = 0, MODE_COPY = 1, MODE_INDEX = 2, MODE_VERIFY = 3 };
/* _pt_load's mode argument: the name of each mode, in enum order. */
static const char *const mode_names[] = {"mmap", "copy", "index", "verify"};
#define MAPPING_CAPSULE "mlutils._ptload.mapping"

typedef struct conv {
    mlu_state *st;
    PyObject *path;       /* borrowed: the caller's path, which every error names */
    const mlu_pt *pt;
    PyObject **memo;      /* owned refs, one slot per node */
    PyObject **storages;  /* owned refs: uint8 arrays (or Py_None in index mode) */
    PyObject *keys;       /* owned: list of storage key strings */
    /* owned: the hooks object's callables, read by name (see py_pt_load) */
    PyObject *hook_tensor, *hook_dtype, *hook_size, *hook_device;
    PyObject *tensor_kwnames; /* owned: hooks.tensor's keyword names, made on first use */
    PyObject *device_kwnames; /* owned: hooks.device's keyword names, made on first use */
    PyObject *odict;      /* owned: collections.OrderedDict */
    PyObject *counter;    /* owned: collections.Counter */
} conv;

static void mapping_destructor(PyObject *cap)
{
    mlu_file_map *m = PyCapsule_GetPointer(cap, MAPPING_CAPSULE);
    if (m != NULL) {
        mlu_file_map_close(m);
        mlu_free(m);
    }
}

/* TorchFormatError("'path': " + PyUnicode_FromFormat(fmt, ...)); NULL. */
static PyObject *fmt_error(conv *c, const char *fmt, ...)
{
    va_list ap;
    PyObject *msg;
    va_start(ap, fmt);
    msg = PyUnicode_FromFormatV(fmt, ap);
    va_end(ap);
    if (msg != NULL)
        mlu_raise_about(c->st->TorchFormatError, c->path, "%U", msg);
    Py_XDECREF(msg);
    return NULL;
}

/* With an exception set by a hook or a setattr: anything but MemoryError and
 * our own errors becomes TorchFormatError("<what>: <message>") with the
 * original chained as its cause, so a load raises only our errors.  `name`
 * (borrowed, may be NULL) is shown after `what`. */
static void wrap_error(conv *c, const char *what, PyObject *name)
{
    PyObject *t1, *cause, *tb1, *t2, *exc, *tb2;

    if (!PyErr_Occurred() || PyErr_ExceptionMatches(PyExc_MemoryError) ||
        PyErr_ExceptionMatches(c->st->TorchFormatError) || PyErr_ExceptionMatches(c->st->UnsafePickleError))
        return;
    PyErr_Fetch(&t1, &cause, &tb1);
    PyErr_NormalizeException(&t1, &cause, &tb1);
    if (name != NULL)
        fmt_error(c, "%s %R from the pickle: %S", what, name, cause);
    else
        fmt_error(c, "%s from the pickle: %S", what, cause);
    PyErr_Fetch(&t2, &exc, &tb2);
    PyErr_NormalizeException(&t2, &exc, &tb2);
    if (exc != NULL && cause != NULL)
        PyException_SetCause(exc, Py_NewRef(cause)); /* steals the new ref */
    PyErr_Restore(t2, exc, tb2);
    Py_XDECREF(t1);
    Py_XDECREF(cause);
    Py_XDECREF(tb1);
}

static PyObject *convert(conv *c, uint32_t id, int depth);

/* New ref: a str from pickle bytes. */
static PyObject *make_str(conv *c, const mlu_pk_node *n)
{
    PyObject *s = PyUnicode_DecodeUTF8(n->u.s.p, (Py_ssize_t)n->u.s.n, "surrogatepass");
    if (s == NULL && PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
        PyErr_Clear();
        fmt_error(c, "string in the pickle is not valid UTF-8");
    }
    return s;
}

static PyObject *make_bigint(const mlu_pk_node *n)
{
    PyObject *b = NULL, *args = NULL, *kw = NULL, *fn = NULL, *res = NULL;

    b = PyBytes_FromStringAndSize(n->u.s.p, (Py_ssize_t)n->u.s.n);
    fn = PyObject_GetAttrString((PyObject *)&PyLong_Type, "from_bytes");
    kw = Py_BuildValue("{s:O}", "signed", Py_True);
    if (b == NULL || fn == NULL || kw == NULL)
        goto done;
    args = Py_BuildValue("(Os)", b, "little");
    if (args == NULL)
        goto done;
    res = PyObject_Call(fn, args, kw);
done:
    Py_XDECREF(b);
    Py_XDECREF(args);
    Py_XDECREF(kw);
    Py_XDECREF(fn);
    return res;
}

/* New ref: a tuple of n ints. */
static PyObject *int_tuple(const int64_t *v, int n)
{
    PyObject *t = PyTuple_New(n);
    int i;
    if (t == NULL)
        goto done;
    for (i = 0; i < n; i++) {
        PyObject *x = PyLong_FromLongLong(v[i]);
        if (x == NULL) {
            Py_CLEAR(t);
            goto done;
        }
        PyTuple_SET_ITEM(t, i, x);  /* steals x */
    }
done:
    return t;
}

/* New ref: hook(**{names[i]: values[i]}), every argument by keyword.
 * *kwnames (owned by the conv) is the tuple of names, made on first use;
 * values are borrowed, and a NULL among them (making it failed) fails the call. */
static PyObject *call_by_name(PyObject *hook, PyObject **kwnames, const char *const *names,
                              PyObject *const *values, Py_ssize_t n)
{
    Py_ssize_t i;

    for (i = 0; i < n; i++)
        if (values[i] == NULL)
            return NULL;
    if (*kwnames == NULL) {
        PyObject *t = PyTuple_New(n); /* new ref */
        for (i = 0; t != NULL && i < n; i++) {
            PyObject *name = PyUnicode_InternFromString(names[i]); /* new ref */
            if (name == NULL)
                Py_CLEAR(t);
            else
                PyTuple_SET_ITEM(t, i, name); /* steals name */
        }
        if (t == NULL)
            return NULL;
        *kwnames = t;
    }
    return PyObject_Vectorcall(hook, values, 0, *kwnames);
}

/* The keyword arguments of hooks.tensor, in the order of make_tensor's values. */
enum {
    TA_STORAGE, TA_KEY, TA_NAME, TA_OFFSET, TA_SHAPE, TA_STRIDE, TA_REQUIRES_GRAD, TA_IS_PARAMETER, TA_CONJ, TA_NEG,
    TA_COUNT
};
static const char *const tensor_arg_names[TA_COUNT] = {
    "storage", "key", "name", "offset", "shape", "stride", "requires_grad", "is_parameter", "conj", "neg",
};

/* New ref: hooks.tensor(storage=, key=, name= (dtype name), offset=, shape=,
 * stride=, requires_grad=, is_parameter=, conj=, neg=), every argument by
 * keyword; conj and neg (0 or 1) are torch's conjugate and negative bits:
 * the tensor's values are the view's elements conjugated / negated. */
static PyObject *make_tensor(conv *c, const mlu_pk_tensor *t)
{
    uint32_t s = c->pt->vm.pids[t->pid].storage;
    PyObject *v[TA_COUNT] = {NULL}, *res;
    int i;

    v[TA_STORAGE] = Py_NewRef(c->storages[s]);
    v[TA_KEY] = Py_NewRef(PyList_GET_ITEM(c->keys, s));
    v[TA_NAME] = PyUnicode_FromString(mlu_torch_dtypes[t->dtype].name);
    v[TA_OFFSET] = PyLong_FromUnsignedLongLong((unsigned long long)t->offset);
    v[TA_SHAPE] = int_tuple(t->shape, t->ndim);
    v[TA_STRIDE] = int_tuple(t->stride, t->ndim);
    v[TA_REQUIRES_GRAD] = PyLong_FromLong(t->requires_grad);
    v[TA_IS_PARAMETER] = PyLong_FromLong(t->is_parameter);
    v[TA_CONJ] = PyLong_FromLong((t->flags & MLU_PT_FLAG_CONJ) != 0);
    v[TA_NEG] = PyLong_FromLong((t->flags & MLU_PT_FLAG_NEG) != 0);
    res = call_by_name(c->hook_tensor, &c->tensor_kwnames, tensor_arg_names, v, TA_COUNT);
    if (res == NULL)
        wrap_error(c, "cannot build the tensor", NULL);
    for (i = 0; i < TA_COUNT; i++)
        Py_XDECREF(v[i]);
    return res;
}

/* The keyword arguments of hooks.device: torch.device(type, index). */
enum { DA_TYPE, DA_INDEX, DA_COUNT };
static const char *const device_arg_names[DA_COUNT] = {"type", "index"};

/* New ref: hooks.device(type= (str, e.g. "cuda"), index= (int, or None when
 * the pickle gave none)), every argument by keyword. */
static PyObject *make_device(conv *c, const mlu_pk_node *n)
{
    PyObject *v[DA_COUNT], *res;

    v[DA_TYPE] = make_str(c, n);
    v[DA_INDEX] = n->u.s.index >= 0 ? PyLong_FromLongLong((long long)n->u.s.index) : Py_NewRef(Py_None);
    res = call_by_name(c->hook_device, &c->device_kwnames, device_arg_names, v, DA_COUNT);
    if (res == NULL)
        wrap_error(c, "cannot build a torch.device", NULL);
    Py_XDECREF(v[DA_TYPE]);
    Py_XDECREF(v[DA_INDEX]);
    return res;
}

/* Fills a dict-like `obj` from node n's key/value items. */
static int fill_dict(conv *c, PyObject *obj, const mlu_pk_node *n, int depth)
{
    uint32_t i;
    for (i = 0; i + 1 < n->len; i += 2) {
        PyObject *k = convert(c, n->u.items[i], depth + 1), *v = NULL;
        int rc = -1;
        if (k != NULL)
            v = convert(c, n->u.items[i + 1], depth + 1);
        if (v != NULL) {
            rc = PyObject_SetItem(obj, k, v);
            if (rc < 0 && PyErr_ExceptionMatches(PyExc_TypeError)) {
                PyErr_Clear();
                fmt_error(c, "dict key of type %s in the pickle is not hashable", Py_TYPE(k)->tp_name);
            }
        }
        Py_XDECREF(k);
        Py_XDECREF(v);
        if (rc < 0)
            return -1;
    }
    return 0;
}

/* Sets the str-keyed items of dict node `attrs` as attributes of obj: into
 * its __dict__ when `into_dict` (OrderedDict BUILD, as inst.__dict__.update),
 * else with setattr (tensor state, as torch's _set_obj_state).  A failure
 * other than MemoryError becomes TorchFormatError with the cause chained. */
static int set_attrs(conv *c, PyObject *obj, uint32_t attrs, int depth, int into_dict)
{
    const mlu_pk_node *a = &c->pt->vm.nodes[attrs];
    PyObject *d = NULL;
    uint32_t i;
    int res = -1;

    if (into_dict && (d = PyObject_GetAttrString(obj, "__dict__")) == NULL)
        return -1;
    for (i = 0; i + 1 < a->len; i += 2) {
        PyObject *k = convert(c, a->u.items[i], depth + 1), *v = NULL;
        int rc = -1;
        if (k != NULL && !PyUnicode_Check(k))
            fmt_error(c, "attribute name is a %s, not a str", Py_TYPE(k)->tp_name);
        else if (k != NULL && (v = convert(c, a->u.items[i + 1], depth + 1)) != NULL) {
            rc = d != NULL ? PyDict_SetItem(d, k, v) : PyObject_SetAttr(obj, k, v);
            if (rc < 0)
                wrap_error(c, "cannot set attribute", k);
        }
        Py_XDECREF(k);
        Py_XDECREF(v);
        if (rc < 0)
            goto done;
    }
    res = 0;
done:
    Py_XDECREF(d);
    return res;
}

/* New ref: bytes from a _codecs.encode(str, "latin1") node. */
static PyObject *make_bytes(conv *c, const mlu_pk_node *n)
{
    PyObject *s = make_str(c, n), *o = NULL;

    if (s == NULL)
        goto done;
    o = PyUnicode_AsLatin1String(s);
    if (o == NULL && PyErr_ExceptionMatches(PyExc_UnicodeEncodeError)) {
        PyErr_Clear();
        fmt_error(c, "_codecs.encode argument holds code points above 255");
    }
done:
    Py_XDECREF(s);
    return o;
}

/* New ref: bytearray(), or bytearray(<its one argument>). */
static PyObject *make_bytearray(conv *c, const mlu_pk_node *n, int depth)
{
    PyObject *b = NULL, *o = NULL;

    if (n->len == 0) {
        o = PyByteArray_FromStringAndSize("", 0);
        goto done;
    }
    b = convert(c, n->u.items[0], depth + 1);
    if (b != NULL)
        o = PyByteArray_FromObject(b);
done:
    Py_XDECREF(b);
    return o;
}

/* Converts node n's items into o: a new tuple of n->len slots, a list or a
 * set.  0, or -1 with an exception set (TorchFormatError for an unhashable
 * set item). */
static int add_items(conv *c, const mlu_pk_node *n, int depth, PyObject *o)
{
    uint32_t i;
    int rc = 0;

    for (i = 0; i < n->len && rc == 0; i++) {
        PyObject *x = convert(c, n->u.items[i], depth + 1);
        if (x == NULL)
            rc = -1;
        else if (PyTuple_Check(o))
            PyTuple_SET_ITEM(o, i, Py_NewRef(x)); /* steals the new ref */
        else
            rc = PySet_Check(o) ? PySet_Add(o, x) : PyList_Append(o, x);
        Py_XDECREF(x);
    }
    if (rc < 0 && PySet_Check(o) && PyErr_ExceptionMatches(PyExc_TypeError)) {
        PyErr_Clear();
        fmt_error(c, "set item in the pickle is not hashable");
    }
    return rc;
}

/* New ref: the tuple of node id, or hooks.size(tuple) for a torch.Size. */
static PyObject *make_tuple(conv *c, uint32_t id, int depth)
{
    const mlu_pk_node *n = &c->pt->vm.nodes[id];
    PyObject *items = PyTuple_New(n->len), *o = NULL;

    if (items == NULL || add_items(c, n, depth, items) < 0)
        goto done;
    if (n->kind == MLU_PKN_SIZE) {
        o = PyObject_CallOneArg(c->hook_size, items);
        if (o == NULL)
            wrap_error(c, "cannot build a torch.Size", NULL);
    } else if (c->memo[id] != NULL) { /* made while converting a cycle through a list */
        o = Py_NewRef(c->memo[id]);
    } else {
        o = Py_NewRef(items);
    }
done:
    Py_XDECREF(items);
    return o;
}

/* New ref: the list, set or dict (OrderedDict, Counter; with its attributes)
 * of node id, in the memo before its items (cycles). */
static PyObject *make_container(conv *c, uint32_t id, int depth)
{
    const mlu_pk_node *n = &c->pt->vm.nodes[id];
    PyObject *o;
    int rc;

    if (n->kind == MLU_PKN_LIST)
        o = PyList_New(0);
    else if (n->kind == MLU_PKN_SET)
        o = PySet_New(NULL);
    else if (n->flags & MLU_PK_F_ORDERED)
        o = PyObject_CallNoArgs(c->odict);
    else if (n->flags & MLU_PK_F_COUNTER)
        o = PyObject_CallNoArgs(c->counter);
    else
        o = PyDict_New();
    if (o == NULL)
        goto done;
    c->memo[id] = Py_NewRef(o);
    if (n->kind != MLU_PKN_DICT)
        rc = add_items(c, n, depth, o);
    else if ((rc = fill_dict(c, o, n, depth)) == 0 && n->attrs != MLU_PK_NONE_ID)
        rc = set_attrs(c, o, n->attrs, depth, 1);
    if (rc < 0)
        Py_CLEAR(o);
done:
    return o;
}

/* New ref: the tensor of node n with its Python attributes (kept on torch
 * tensors; NumPy arrays cannot hold them). */
static PyObject *make_tensor_node(conv *c, const mlu_pk_node *n, int depth)
{
    PyObject *o = make_tensor(c, &c->pt->vm.tensors[n->u.ref]);

    if (o != NULL && n->attrs != MLU_PK_NONE_ID && !PyArray_Check(o) && set_attrs(c, o, n->attrs, depth, 0) < 0)
        Py_CLEAR(o);
    return o;
}

/* New ref: the object of node id (made once: the memo keeps it). */
static PyObject *convert(conv *c, uint32_t id, int depth)
{
    const mlu_pk_node *n = &c->pt->vm.nodes[id];
    PyObject *o = NULL;

    if (c->memo[id] != NULL) {
        o = Py_NewRef(c->memo[id]);
        goto done;
    }
    if (depth > MLU_PK_MAX_DEPTH) {
        fmt_error(c, MLU_PK_DEPTH_RULE);
        goto done;
    }
    switch (n->kind) {
    case MLU_PKN_NONE:
        o = Py_NewRef(Py_None);
        break;
    case MLU_PKN_BOOL:
        o = PyBool_FromLong((long)n->u.i);
        break;
    case MLU_PKN_INT:
        o = PyLong_FromLongLong(n->u.i);
        break;
    case MLU_PKN_BIGINT:
        o = make_bigint(n);
        break;
    case MLU_PKN_FLOAT:
        o = PyFloat_FromDouble(n->u.f);
        break;
    case MLU_PKN_COMPLEX:
        o = PyComplex_FromDoubles(n->u.c.re, n->u.c.im);
        break;
    case MLU_PKN_STR:
        o = make_str(c, n);
        break;
    case MLU_PKN_BYTES:
        o = make_bytes(c, n);
        break;
    case MLU_PKN_BYTEARRAY:
        o = make_bytearray(c, n, depth);
        break;
    case MLU_PKN_TUPLE:
    case MLU_PKN_SIZE:
        o = make_tuple(c, id, depth);
        break;
    case MLU_PKN_LIST:
    case MLU_PKN_SET:
    case MLU_PKN_DICT:
        o = make_container(c, id, depth);
        break;
    case MLU_PKN_DEVICE:
        o = make_device(c, n);
        break;
    case MLU_PKN_DTYPE:
        o = PyObject_CallFunction(c->hook_dtype, "s", mlu_torch_dtypes[n->sub].name);
        if (o == NULL)
            wrap_error(c, "cannot build a torch dtype", NULL);
        break;
    case MLU_PKN_TENSOR:
        o = make_tensor_node(c, n, depth);
        break;
    case MLU_PKN_STORAGE:
        fmt_error(c, "a bare storage (not inside a tensor) is not supported");
        break;
    default:
        fmt_error(c, "a bare %s global cannot be returned as a value", mlu_pk_kind_name(n->kind));
        break;
    }
    /* containers put themselves in the memo before their items (cycles) */
    if (o != NULL && c->memo[id] == NULL)
        c->memo[id] = Py_NewRef(o);
done:
    return o;
}

/* 1 when some storage will view the mapping (mode 0). */
static int any_in_place(const mlu_pt *pt)
{
    uint32_t i;
    for (i = 0; i < pt->vm.n_storages; i++)
        if (pt->vm.storages[i].nbytes > 0 && mlu_pt_storage_in_place(pt, i, 16))
            return 1;
    return 0;
}

/* Makes the uint8 array of every storage.  capsule (borrowed) owns map, or
 * both are NULL when nothing is viewed in place. */
static int make_storages(conv *c, PyObject *capsule, const mlu_file_map *map, int mode)
{
    const mlu_pt *pt = c->pt;
    uint32_t i;
    int res = -1;

    for (i = 0; i < pt->vm.n_storages; i++) {
        const mlu_pk_storage *s = &pt->vm.storages[i];
        npy_intp dim = (npy_intp)s->nbytes;
        PyObject *key = PyUnicode_DecodeUTF8(s->key, (Py_ssize_t)s->key_len, "surrogatepass"), *arr = NULL;
        int rc;

        if (key == NULL)
            goto done;
        rc = PyList_Append(c->keys, key);
        Py_DECREF(key);
        if (rc < 0)
            goto done;
        if (mode == MODE_INDEX || mode == MODE_VERIFY) {
            c->storages[i] = Py_NewRef(Py_None);
            continue;
        }
        if (s->nbytes > (uint64_t)NPY_MAX_INTP) {
            fmt_error(c, "storage %R is too large for this machine", PyList_GET_ITEM(c->keys, i));
            goto done;
        }
        if (map != NULL && mode == MODE_MMAP && mlu_pt_storage_in_place(pt, i, 16)) {
            arr = PyArray_New(&PyArray_Type, 1, &dim, NPY_UINT8, NULL, (void *)(map->data + pt->src[i].offset), 0,
                              NPY_ARRAY_CARRAY, NULL);
            if (arr == NULL)
                goto done;
            /* steals the new ref to the capsule, even on failure */
            if (PyArray_SetBaseObject((PyArrayObject *)arr, Py_NewRef(capsule)) < 0) {
                Py_DECREF(arr);
                goto done;
            }
        } else {
            mlu_error err;
            mlu_status st;
            mlu_error_clear(&err);
            arr = PyArray_SimpleNew(1, &dim, NPY_UINT8);
            if (arr == NULL)
                goto done;
            Py_BEGIN_ALLOW_THREADS
            st = mlu_pt_storage_fill(pt, i, (uint8_t *)PyArray_BYTES((PyArrayObject *)arr), &err);
            Py_END_ALLOW_THREADS
            if (st != MLU_OK) {
                Py_DECREF(arr);
                mlu_raise(c->st, &err, MLU_DOMAIN_TORCH, c->path);
                goto done;
            }
        }
        c->storages[i] = arr;  /* owned by c */
    }
    res = 0;
done:
    return res;
}

/* New ref: a capsule owning a private mapping of fd's first `size` bytes,
 * after checking that the file still has them (pages past a shrunken end
 * would raise SIGBUS when touched). */
static PyObject *map_file(mlu_state *st, int fd, uint64_t size, PyObject *path)
{
    PyObject *capsule = NULL;
    mlu_file_map *map = NULL;
    mlu_error err;
    mlu_status rc;

    mlu_error_clear(&err);
    map = mlu_calloc(1, sizeof(*map));
    if (map == NULL) {
        PyErr_NoMemory();
        goto error;
    }
    Py_BEGIN_ALLOW_THREADS
    rc = mlu_file_map_fd(map, fd, size, &err);
    if (rc == MLU_OK)
        rc = mlu_file_check_size(fd, size, &err);
    Py_END_ALLOW_THREADS
    if (rc != MLU_OK) {
        mlu_raise(st, &err, MLU_DOMAIN_TORCH, path);
        goto error;
    }
    /* the capsule owns the mapping from here on */
    capsule = PyCapsule_New(map, MAPPING_CAPSULE, mapping_destructor);
    if (capsule == NULL)
        goto error;
    goto done;
error:
    if (map != NULL) {
        mlu_file_map_close(map);
        mlu_free(map);
    }
done:
    return capsule;
}

static PyObject *py_pt_load(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    mlu_state *st = mlu_get_state(m);
    PyObject *path_bytes = NULL, *capsule = NULL, *res = NULL, *coll = NULL;
    mlu_pt pt;
    mlu_rd rd;
    int pt_open = 0, mode = 0, fd = -1;
    const char *mode_name;
    uint64_t size = 0;
    mlu_error err;
    mlu_status rc;
    conv c;

    memset(&c, 0, sizeof(c));
    memset(&pt, 0, sizeof(pt));
    mlu_error_clear(&err);
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "_pt_load(path, mode, hooks) takes 3 arguments");
        goto done;
    }
    mode_name = PyUnicode_Check(args[1]) ? PyUnicode_AsUTF8(args[1]) : NULL;
    if (mode_name == NULL && PyErr_Occurred())
        goto done;
    for (mode = 0; mode_name != NULL && mode <= MODE_VERIFY; mode++)
        if (strcmp(mode_name, mode_names[mode]) == 0)
            break;
    if (mode_name == NULL || mode > MODE_VERIFY) {
        PyErr_Format(PyExc_ValueError, "_pt_load: mode must be 'mmap', 'copy', 'index' or 'verify', not %R",
                     args[1]);
        goto done;
    }
    if ((c.hook_tensor = PyObject_GetAttrString(args[2], "tensor")) == NULL ||
        (c.hook_dtype = PyObject_GetAttrString(args[2], "dtype")) == NULL ||
        (c.hook_size = PyObject_GetAttrString(args[2], "size")) == NULL ||
        (c.hook_device = PyObject_GetAttrString(args[2], "device")) == NULL) {
        if (PyErr_ExceptionMatches(PyExc_AttributeError)) {
            PyErr_Clear();
            PyErr_SetString(PyExc_TypeError, "_pt_load: hooks must have tensor, dtype, size and device callables");
        }
        goto done;
    }
    if (!PyUnicode_FSConverter(args[0], &path_bytes))
        goto done;
    Py_BEGIN_ALLOW_THREADS
    rc = mlu_file_open_ro(PyBytes_AS_STRING(path_bytes), &fd, &size, &err);
    Py_END_ALLOW_THREADS
    if (rc == MLU_OK && size == 0)
        rc = mlu_error_set(&err, MLU_EFORMAT, 0, "the file is empty: not a PyTorch file");
    if (rc != MLU_OK) {
        mlu_raise(st, &err, MLU_DOMAIN_TORCH, args[0]);
        goto done;
    }
    mlu_rd_fd(&rd, fd, size);
    Py_BEGIN_ALLOW_THREADS
    rc = mlu_pt_open(&pt, &rd, mode == MODE_VERIFY, &err);
    Py_END_ALLOW_THREADS
    if (rc != MLU_OK) {
        mlu_raise(st, &err, MLU_DOMAIN_TORCH, args[0]);
        goto done;
    }
    pt_open = 1;
    if (mode == MODE_MMAP && any_in_place(&pt) && (capsule = map_file(st, fd, size, args[0])) == NULL)
        goto done;
    c.st = st;
    c.path = args[0];
    c.pt = &pt;
    coll = PyImport_ImportModule("collections");
    if (coll == NULL)
        goto done;
    c.odict = PyObject_GetAttrString(coll, "OrderedDict");
    c.counter = PyObject_GetAttrString(coll, "Counter");
    c.keys = PyList_New(0);
    c.memo = PyMem_Calloc(pt.vm.n_nodes ? pt.vm.n_nodes : 1, sizeof(PyObject *));
    c.storages = PyMem_Calloc(pt.vm.n_storages ? pt.vm.n_storages : 1, sizeof(PyObject *));
    if (c.odict == NULL || c.counter == NULL || c.keys == NULL)
        goto done;
    if (c.memo == NULL || c.storages == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if (make_storages(&c, capsule, capsule != NULL ? PyCapsule_GetPointer(capsule, MAPPING_CAPSULE) : NULL, mode) < 0)
        goto done;
    res = convert(&c, pt.root, 0);
done:
    if (c.memo != NULL) {
        uint32_t k;
        for (k = 0; k < pt.vm.n_nodes; k++)
            Py_XDECREF(c.memo[k]);
        PyMem_Free(c.memo);
    }
    if (c.storages != NULL) {
        uint32_t k;
        for (k = 0; k < pt.vm.n_storages; k++)
            Py_XDECREF(c.storages[k]);
        PyMem_Free(c.storages);
    }
    Py_XDECREF(c.hook_tensor);
    Py_XDECREF(c.hook_dtype);
    Py_XDECREF(c.hook_size);
    Py_XDECREF(c.hook_device);
    Py_XDECREF(c.tensor_kwnames);
    Py_XDECREF(c.device_kwnames);
    Py_XDECREF(c.keys);
    Py_XDECREF(c.odict);
    Py_XDECREF(c.counter);
    Py_XDECREF(coll);
    if (pt_open)
        mlu_pt_close(&pt);
    if (fd >= 0)
        close(fd);  /* the mapping, if any, stays valid without it */
    Py_XDECREF(capsule);  /* unmaps unless an array still views the mapping */
    Py_XDECREF(path_bytes);
    return res;
}

/* ------------------------------------------------------------ dtype table */

static PyStructSequence_Field torch_dtype_fields[] = {
    {"name", "torch's name: torch.<name>"},
    {"storage_class", "the legacy storage class (torch.<storage_class>), or None"},
    {"itemsize", "bytes per element"},
    {"numpy", "NumPy's little-endian dtype string, or None when NumPy has none"},
    {"ml_dtypes", "the ml_dtypes type of that name, or None"},
    {"safetensors", "the safetensors dtype, or None when safetensors has none"},
    {NULL, NULL},
};

static PyStructSequence_Desc torch_dtype_desc = {
    "mlutils._core.TorchDtype",
    "One torch dtype as the .pt reader and writer know it (csrc/core/torch_dtypes.c).",
    torch_dtype_fields,
    6,
};

/* New ref: a str, or None for NULL. */
static PyObject *str_or_none(const char *s)
{
    return s != NULL ? PyUnicode_FromString(s) : Py_NewRef(Py_None);
}

/* torch_dtypes(): the dtype table as a tuple of TorchDtype rows (new ref). */
static PyObject *py_torch_dtypes(PyObject *module, PyObject *unused)
{
    mlu_state *st = mlu_get_state(module);
    PyObject *type, *res = NULL, *out = NULL, *row;  /* type: borrowed from the module state */
    int i, k;

    (void)unused;
    if (st == NULL)
        goto done;
    type = st->torch_dtype_type;
    if ((res = PyTuple_New(MLU_TORCH_N_DTYPES)) == NULL)
        goto done;
    for (i = 0; i < MLU_TORCH_N_DTYPES; i++) {
        const mlu_torch_dtype *d = &mlu_torch_dtypes[i];
        PyObject *v[6];
        if ((row = PyStructSequence_New((PyTypeObject *)type)) == NULL)
            goto done;
        PyTuple_SET_ITEM(res, i, row);  /* steals */
        v[0] = PyUnicode_FromString(d->name);
        v[1] = str_or_none(d->storage_class);
        v[2] = PyLong_FromLong(d->itemsize);
        v[3] = str_or_none(d->numpy);
        v[4] = str_or_none(d->ml_dtypes);
        v[5] = str_or_none(d->safetensors);
        for (k = 0; k < 6; k++)
            PyStructSequence_SetItem(row, k, v[k]);  /* steals; NULL left on failure */
        for (k = 0; k < 6; k++)
            if (v[k] == NULL)
                goto done;
    }
    out = res;
    res = NULL;
done:
    Py_XDECREF(res);
    return out;
}

int mlu_ptload_module_init(PyObject *m)
{
    static PyMethodDef methods[] = {
        {"torch_dtypes", py_torch_dtypes, METH_NOARGS,
         "torch_dtypes(): the torch dtypes the .pt reader and writer know, as a tuple of TorchDtype rows\n"
         "(name, storage_class, itemsize, numpy, ml_dtypes, safetensors), from the one C table."},
        {"_pt_load", (PyCFunction)(void (*)(void))py_pt_load, METH_FASTCALL,
         "_pt_load(path, mode, hooks): parse a PyTorch checkpoint with the restricted unpickler.\n"
         "mode 'mmap': storages map the file where possible; 'copy': storages are copies; 'index': no storages;\n"
         "'verify': like 'index', and deflated records are inflated to check them.  hooks: an object with\n"
         "tensor, dtype, size and device callables; tensor and device are called with keyword arguments only."},
        {NULL, NULL, 0, NULL},
    };
    mlu_state *st = mlu_get_state(m);

    if (mlu_add_struct_type(m, &torch_dtype_desc, &st->torch_dtype_type) < 0)
        return -1;
    return PyModule_AddFunctions(m, methods);
}
