/* ptsave.c: the Python face of PyTorch .pt saving.
 *
 * _ptsave_write walks a Python object (dicts, OrderedDicts with their
 * attributes, lists, tuples, plain values, torch tensors and NumPy arrays),
 * pickles it the way torch.save does (core/pickle_write.c, with the same memo
 * decisions as Python's pickler, so data.pkl comes out byte for byte the
 * same), then writes the zip (core/zipwrite.c) with every storage's bytes
 * handed straight from the tensor's memory to the file, GIL released.
 *
 * What is torch-specific to ask of a tensor is asked through two Python
 * callables from mlutils._ptsave (describe, storage_bytes), so nothing here
 * needs torch to be importable. */
#define _GNU_SOURCE
#include "npy.h"
#include "path.h"

#include <fcntl.h>

#include "../core/alloc.h"
#include "../core/atomicfile.h"
#include "../core/buf.h"
#include "../core/pickle_write.h"
#include "../core/ptsave_id.h"
#include "../core/zipwrite.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define MLU_HOST_BYTEORDER "big"
#else
#define MLU_HOST_BYTEORDER "little"
#endif

/* ------------------------------------------------------------------ dtypes */

typedef struct dtype_info {
    const char *name;     /* torch's name: torch.<name> */
    const char *storage;  /* legacy storage class (torch.<storage>), NULL: UntypedStorage + v3 */
    int elsize;
} dtype_info;

static const dtype_info DTYPES[] = {
    {"float64", "DoubleStorage", 8},
    {"float32", "FloatStorage", 4},
    {"float16", "HalfStorage", 2},
    {"bfloat16", "BFloat16Storage", 2},
    {"int64", "LongStorage", 8},
    {"int32", "IntStorage", 4},
    {"int16", "ShortStorage", 2},
    {"int8", "CharStorage", 1},
    {"uint8", "ByteStorage", 1},
    {"bool", "BoolStorage", 1},
    {"complex64", "ComplexFloatStorage", 8},
    {"complex128", "ComplexDoubleStorage", 16},
    {"uint16", NULL, 2},
    {"uint32", NULL, 4},
    {"uint64", NULL, 8},
    {"float8_e4m3fn", NULL, 1},
    {"float8_e5m2", NULL, 1},
    {"float8_e4m3fnuz", NULL, 1},
    {"float8_e5m2fnuz", NULL, 1},
    {"float8_e8m0fnu", NULL, 1},
    {"float4_e2m1fn_x2", NULL, 1},
    {"complex32", NULL, 4},
    {"bits8", NULL, 1},
    {"bits16", NULL, 2},
    {"bits1x8", NULL, 1},
    {"bits2x4", NULL, 1},
    {"bits4x2", NULL, 1},
};
#define N_DTYPES ((int)(sizeof(DTYPES) / sizeof(DTYPES[0])))

static int dtype_index(const char *name)
{
    int i;
    for (i = 0; i < N_DTYPES; i++)
        if (strcmp(DTYPES[i].name, name) == 0)
            return i;
    return -1;
}

/* Globals the pickle can name; each is memoized once, as pickle does. */
enum {
    G_ODICT = 0,
    G_REBUILD_V2,
    G_REBUILD_V3,
    G_REBUILD_PARAM,
    G_UNTYPED,
    G_STORAGE0,                      /* + dtype index: torch.<X>Storage */
    G_DTYPE0 = G_STORAGE0 + N_DTYPES, /* + dtype index: torch.<dtype> */
    G_COUNT = G_DTYPE0 + N_DTYPES
};

/* ------------------------------------------------------------------ state */

typedef struct storage_rec {
    PyObject *key;        /* owned: the key string ("0", "1", ...) */
    PyObject *owner;      /* owned: torch storage, or the NumPy array holding the bytes */
    const char *data;     /* NumPy: the bytes (kept alive by owner); torch: NULL */
    uint64_t nbytes;
    int is_torch;
    int sdtype;           /* dtype index the storage is typed as (uint8 for untyped ones, as torch) */
} storage_rec;

typedef mlu_path path_step; /* see path.h */

typedef struct saver {
    mlu_pkw pk;
    mlu_error err;
    PyObject *memo;         /* owned dict: id(obj) -> memo index */
    PyObject *keep;         /* owned list: every memoized object, so ids stay unique */
    PyObject *tmap;         /* owned dict: torch storage identity -> storage index */
    PyObject *nmap;         /* owned dict: id(NumPy root) -> storage index */
    storage_rec *st;        /* owned */
    Py_ssize_t nst, cap;
    int64_t gmemo[G_COUNT]; /* memo index of each global, -1 before its first use */
    PyObject *s_storage;    /* owned, interned "storage" */
    PyObject *s_cpu;        /* owned, interned "cpu" */
    PyObject *odict_type;   /* owned: collections.OrderedDict */
    PyObject *tensor_type;  /* borrowed: torch.Tensor, or NULL when torch is not loaded */
    PyObject *describe;     /* borrowed */
} saver;

/* ------------------------------------------------------------------ errors */

static int core_fail(saver *s)
{
    mlu_raise(NULL, &s->err, NULL);
    return -1;
}

#define PK(call) ((call) == MLU_OK ? 0 : core_fail(s))

/* ------------------------------------------------------------------ memo */

/* Puts the next memo index and records obj under it. */
static int memo_put(saver *s, PyObject *obj)
{
    uint32_t idx;
    PyObject *key = NULL, *val = NULL;
    int rc = -1;

    if (PK(mlu_pkw_put(&s->pk, &idx, &s->err)) < 0)
        return -1;
    key = PyLong_FromVoidPtr(obj);
    val = PyLong_FromUnsignedLong(idx);
    if (key == NULL || val == NULL)
        goto done;
    if (PyDict_SetItem(s->memo, key, val) < 0 || PyList_Append(s->keep, obj) < 0)
        goto done;
    rc = 0;
done:
    Py_XDECREF(key);
    Py_XDECREF(val);
    return rc;
}

/* 1 and a BINGET written when obj was memoized, 0 when not, -1 on error. */
static int memo_get(saver *s, PyObject *obj)
{
    PyObject *key = PyLong_FromVoidPtr(obj), *val;
    unsigned long idx;

    if (key == NULL)
        return -1;
    val = PyDict_GetItemWithError(s->memo, key); /* borrowed */
    Py_DECREF(key);
    if (val == NULL)
        return PyErr_Occurred() ? -1 : 0;
    idx = PyLong_AsUnsignedLong(val);
    if (idx == (unsigned long)-1 && PyErr_Occurred())
        return -1;
    return PK(mlu_pkw_get(&s->pk, (uint32_t)idx, &s->err)) < 0 ? -1 : 1;
}

static int put_global(saver *s, int g)
{
    uint32_t idx;
    const char *module = "torch", *name;

    if (s->gmemo[g] >= 0)
        return PK(mlu_pkw_get(&s->pk, (uint32_t)s->gmemo[g], &s->err));
    switch (g) {
    case G_ODICT:
        module = "collections";
        name = "OrderedDict";
        break;
    case G_REBUILD_V2:
        module = "torch._utils";
        name = "_rebuild_tensor_v2";
        break;
    case G_REBUILD_V3:
        module = "torch._utils";
        name = "_rebuild_tensor_v3";
        break;
    case G_REBUILD_PARAM:
        module = "torch._utils";
        name = "_rebuild_parameter";
        break;
    case G_UNTYPED:
        module = "torch.storage";
        name = "UntypedStorage";
        break;
    default:
        name = g < G_DTYPE0 ? DTYPES[g - G_STORAGE0].storage : DTYPES[g - G_DTYPE0].name;
        break;
    }
    if (PK(mlu_pkw_global(&s->pk, module, name, &s->err)) < 0)
        return -1;
    if (PK(mlu_pkw_put(&s->pk, &idx, &s->err)) < 0)
        return -1;
    s->gmemo[g] = idx;
    return 0;
}

/* ------------------------------------------------------------------ values */

static int save_obj(saver *s, PyObject *o, const path_step *at);

static int save_str(saver *s, PyObject *o, const path_step *at)
{
    Py_ssize_t n;
    const char *p;
    PyObject *enc = NULL;
    int rc;

    (void)at;
    p = PyUnicode_AsUTF8AndSize(o, &n);
    if (p == NULL) {
        /* Lone surrogates: pickle writes them with 'surrogatepass'. */
        if (!PyErr_ExceptionMatches(PyExc_UnicodeEncodeError))
            return -1;
        PyErr_Clear();
        enc = PyUnicode_AsEncodedString(o, "utf-8", "surrogatepass");
        if (enc == NULL)
            return -1;
        p = PyBytes_AS_STRING(enc);
        n = PyBytes_GET_SIZE(enc);
    }
    rc = PK(mlu_pkw_unicode(&s->pk, p, (size_t)n, &s->err));
    Py_XDECREF(enc);
    if (rc == 0)
        rc = memo_put(s, o);
    return rc;
}

/* A str that may already be in the memo (the synthetic 'storage', 'cpu', keys). */
static int save_str_memo(saver *s, PyObject *o)
{
    int r = memo_get(s, o);
    if (r != 0)
        return r < 0 ? -1 : 0;
    return save_str(s, o, NULL);
}

static int save_long(saver *s, PyObject *o, const path_step *at)
{
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    PyObject *nbits = NULL, *bytes = NULL;
    int rc = -1;

    if (!overflow) {
        if (v == -1 && PyErr_Occurred())
            return -1;
        return PK(mlu_pkw_int(&s->pk, (int64_t)v, &s->err));
    }
    /* Beyond 64 bits: pickle's encode_long, minimal two's complement. */
    nbits = PyObject_CallMethod(o, "bit_length", NULL);
    if (nbits == NULL)
        goto done;
    {
        Py_ssize_t nb = (PyLong_AsSsize_t(nbits) >> 3) + 1;
        const unsigned char *b;
        if (nb > 256) {
            mlu_path_fail(PyExc_OverflowError, "obj", at, "integer of %zd bits is too large for the weights-only format",
                    PyLong_AsSsize_t(nbits));
            goto done;
        }
        {
            PyObject *meth = PyObject_GetAttrString(o, "to_bytes");
            PyObject *a = Py_BuildValue("(ns)", nb, "little");
            PyObject *kw = Py_BuildValue("{sO}", "signed", Py_True);
            if (meth != NULL && a != NULL && kw != NULL)
                bytes = PyObject_Call(meth, a, kw);
            Py_XDECREF(meth);
            Py_XDECREF(a);
            Py_XDECREF(kw);
        }
        if (bytes == NULL)
            goto done;
        b = (const unsigned char *)PyBytes_AS_STRING(bytes);
        if (overflow < 0 && nb > 1 && b[nb - 1] == 0xff && (b[nb - 2] & 0x80) != 0)
            nb--;
        if (nb > 255) {
            mlu_path_fail(PyExc_OverflowError, "obj", at, "integer is too large for the weights-only format");
            goto done;
        }
        rc = PK(mlu_pkw_long_bytes(&s->pk, b, (size_t)nb, &s->err));
    }
done:
    Py_XDECREF(nbits);
    Py_XDECREF(bytes);
    return rc;
}

/* SETITEM(S) batches over a list of (key, value) pairs, the way the C
 * pickler does it: `exact` for a real dict (batch_dict_exact: one item alone
 * uses SETITEM, otherwise MARK ... SETITEMS per 1000, with an empty batch
 * after an exact multiple of 1000), else for the items iterator an
 * OrderedDict's __reduce__ returns (batch_dict: a lone item in any batch uses
 * SETITEM). */
static int save_items(saver *s, PyObject *items, const path_step *at, int attr, int exact)
{
    Py_ssize_t n = PyList_GET_SIZE(items), i = 0;

    if (n == 0)
        return 0;
    for (;;) {
        Py_ssize_t batch = n - i < MLU_PK_BATCH ? n - i : MLU_PK_BATCH, j;
        int single = exact ? n == 1 : batch == 1;
        if (!exact && batch == 0)
            break;
        if (!single && PK(mlu_pkw_op(&s->pk, MLU_PK_MARK, &s->err)) < 0)
            return -1;
        for (j = i; j < i + batch; j++) {
            PyObject *kv = PyList_GET_ITEM(items, j);
            PyObject *k = PyTuple_GET_ITEM(kv, 0), *v = PyTuple_GET_ITEM(kv, 1);
            path_step step = {at, k, j, attr};
            if (save_obj(s, k, &step) < 0 || save_obj(s, v, &step) < 0)
                return -1;
        }
        if (PK(mlu_pkw_op(&s->pk, single ? MLU_PK_SETITEM : MLU_PK_SETITEMS, &s->err)) < 0)
            return -1;
        i += batch;
        if (single || batch < MLU_PK_BATCH)
            break;
    }
    return 0;
}

static int save_dict(saver *s, PyObject *d, const path_step *at, int attr)
{
    PyObject *items;
    int rc;

    if (PK(mlu_pkw_op(&s->pk, MLU_PK_EMPTY_DICT, &s->err)) < 0 || memo_put(s, d) < 0)
        return -1;
    items = PyDict_Items(d);
    if (items == NULL)
        return -1;
    rc = save_items(s, items, at, attr, 1);
    Py_DECREF(items);
    return rc;
}

static int save_odict(saver *s, PyObject *d, const path_step *at)
{
    PyObject *items = NULL, *state = NULL;
    int rc = -1;

    if (put_global(s, G_ODICT) < 0 || PK(mlu_pkw_op(&s->pk, MLU_PK_EMPTY_TUPLE, &s->err)) < 0
        || PK(mlu_pkw_op(&s->pk, MLU_PK_REDUCE, &s->err)) < 0 || memo_put(s, d) < 0)
        goto done;
    items = PyMapping_Items(d);
    if (items == NULL || save_items(s, items, at, 0, 0) < 0)
        goto done;
    /* Attributes (a state dict's _metadata) travel as BUILD state, as
     * OrderedDict.__reduce__ gives them to pickle. */
    state = PyObject_GenericGetDict(d, NULL);
    if (state == NULL)
        goto done;
    if (PyDict_GET_SIZE(state) > 0) {
        int r = memo_get(s, state);
        if (r < 0 || (r == 0 && save_dict(s, state, at, 1) < 0))
            goto done;
        if (PK(mlu_pkw_op(&s->pk, MLU_PK_BUILD, &s->err)) < 0)
            goto done;
    }
    rc = 0;
done:
    Py_XDECREF(items);
    Py_XDECREF(state);
    return rc;
}

/* The C pickler's batch_list_exact: one item alone uses APPEND, otherwise
 * MARK ... APPENDS per 1000 items. */
static int save_list(saver *s, PyObject *l, const path_step *at)
{
    Py_ssize_t i = 0;
    int single;

    if (PK(mlu_pkw_op(&s->pk, MLU_PK_EMPTY_LIST, &s->err)) < 0 || memo_put(s, l) < 0)
        return -1;
    if (PyList_GET_SIZE(l) == 0)
        return 0;
    single = PyList_GET_SIZE(l) == 1;
    while (i < PyList_GET_SIZE(l)) {
        Py_ssize_t batch = 0;
        if (!single && PK(mlu_pkw_op(&s->pk, MLU_PK_MARK, &s->err)) < 0)
            return -1;
        while (i < PyList_GET_SIZE(l) && batch < MLU_PK_BATCH) {
            PyObject *item = PyList_GET_ITEM(l, i);
            path_step step = {at, NULL, i, 0};
            int rc;
            Py_INCREF(item);
            rc = save_obj(s, item, &step);
            Py_DECREF(item);
            if (rc < 0)
                return -1;
            i++;
            batch++;
        }
        if (PK(mlu_pkw_op(&s->pk, single ? MLU_PK_APPEND : MLU_PK_APPENDS, &s->err)) < 0)
            return -1;
    }
    return 0;
}

static int save_tuple(saver *s, PyObject *t, const path_step *at)
{
    Py_ssize_t n = PyTuple_GET_SIZE(t), i;
    static const int small[4] = {0, MLU_PK_TUPLE1, MLU_PK_TUPLE2, MLU_PK_TUPLE3};
    int r;

    if (n == 0)
        return PK(mlu_pkw_op(&s->pk, MLU_PK_EMPTY_TUPLE, &s->err));
    if (n > 3 && PK(mlu_pkw_op(&s->pk, MLU_PK_MARK, &s->err)) < 0)
        return -1;
    for (i = 0; i < n; i++) {
        path_step step = {at, NULL, i, 0};
        if (save_obj(s, PyTuple_GET_ITEM(t, i), &step) < 0)
            return -1;
    }
    r = memo_get(s, t);
    if (r < 0)
        return -1;
    if (r > 0)
        return mlu_path_fail(PyExc_ValueError, "obj", at,
                       "a tuple that contains itself cannot be written in the weights-only format");
    if (PK(mlu_pkw_op(&s->pk, n > 3 ? MLU_PK_TUPLE : small[n], &s->err)) < 0)
        return -1;
    return memo_put(s, t);
}

/* A tuple of ints made up by the writer (size, stride): never shared. */
static int save_int_tuple(saver *s, const int64_t *v, Py_ssize_t n)
{
    static const int small[4] = {0, MLU_PK_TUPLE1, MLU_PK_TUPLE2, MLU_PK_TUPLE3};
    Py_ssize_t i;

    if (n == 0)
        return PK(mlu_pkw_op(&s->pk, MLU_PK_EMPTY_TUPLE, &s->err));
    if (n > 3 && PK(mlu_pkw_op(&s->pk, MLU_PK_MARK, &s->err)) < 0)
        return -1;
    for (i = 0; i < n; i++)
        if (PK(mlu_pkw_int(&s->pk, v[i], &s->err)) < 0)
            return -1;
    if (PK(mlu_pkw_op(&s->pk, n > 3 ? MLU_PK_TUPLE : small[n], &s->err)) < 0)
        return -1;
    return PK(mlu_pkw_put(&s->pk, NULL, &s->err));
}

/* ------------------------------------------------------------------ tensors */

/* Index of the storage with this identity, registering it the first time.
 * owner: borrowed (a new reference is kept). */
static Py_ssize_t find_storage(saver *s, PyObject *map, PyObject *ident, PyObject *owner,
                               const char *data, uint64_t nbytes, int is_torch, int sdtype,
                               const path_step *at)
{
    PyObject *hit = PyDict_GetItemWithError(map, ident); /* borrowed */
    PyObject *num = NULL, *key = NULL, *idx = NULL;
    storage_rec *r;
    Py_ssize_t i = -1;

    if (hit != NULL) {
        i = PyLong_AsSsize_t(hit);
        if (i < 0)
            return -1;
        r = &s->st[i];
        if (r->sdtype != sdtype) {
            mlu_path_fail(PyExc_ValueError, "obj", at,
                    "cannot save tensors that view the same storage as different types (%s and %s)",
                    DTYPES[r->sdtype].name, DTYPES[sdtype].name);
            return -1;
        }
        return i;
    }
    if (PyErr_Occurred())
        return -1;
    if (s->nst == s->cap) {
        Py_ssize_t ncap = s->cap ? s->cap * 2 : 16;
        storage_rec *n = mlu_realloc(s->st, (size_t)ncap * sizeof(*n));
        if (n == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        s->st = n;
        s->cap = ncap;
    }
    /* The key is str(len(...)), exactly as torch makes it. */
    num = PyLong_FromSsize_t(s->nst);
    key = num ? PyObject_Str(num) : NULL;
    idx = num;
    if (key == NULL || PyDict_SetItem(map, ident, idx) < 0)
        goto done;
    r = &s->st[s->nst];
    r->key = key;
    key = NULL;
    Py_INCREF(owner);
    r->owner = owner;
    r->data = data;
    r->nbytes = nbytes;
    r->is_torch = is_torch;
    r->sdtype = sdtype;
    i = s->nst++;
done:
    Py_XDECREF(num);
    Py_XDECREF(key);
    return i;
}

typedef struct tensor_desc {
    int dt;                 /* dtype index */
    Py_ssize_t ndim;
    int64_t *size;          /* owned by the caller (ndim entries) */
    int64_t *stride;
    int64_t offset;         /* elements */
    int requires_grad;
    Py_ssize_t storage;     /* index */
    PyObject *metadata;     /* borrowed dict or NULL */
} tensor_desc;

/* _rebuild_tensor_v2/v3(storage, offset, size, stride, requires_grad, hooks[, dtype][, metadata]). */
static int emit_tensor(saver *s, PyObject *obj, const tensor_desc *d)
{
    const dtype_info *di = &DTYPES[d->dt];
    const storage_rec *r = &s->st[d->storage];
    int v3 = di->storage == NULL;
    uint64_t numel = v3 ? r->nbytes : r->nbytes / (uint64_t)di->elsize;

    if (put_global(s, v3 ? G_REBUILD_V3 : G_REBUILD_V2) < 0
        || PK(mlu_pkw_op(&s->pk, MLU_PK_MARK, &s->err)) < 0
        /* persistent id ('storage', class, key, 'cpu', numel) */
        || PK(mlu_pkw_op(&s->pk, MLU_PK_MARK, &s->err)) < 0
        || save_str_memo(s, s->s_storage) < 0
        || put_global(s, v3 ? G_UNTYPED : G_STORAGE0 + d->dt) < 0
        || save_str_memo(s, r->key) < 0
        || save_str_memo(s, s->s_cpu) < 0
        || PK(mlu_pkw_int(&s->pk, (int64_t)numel, &s->err)) < 0
        || PK(mlu_pkw_op(&s->pk, MLU_PK_TUPLE, &s->err)) < 0
        || PK(mlu_pkw_put(&s->pk, NULL, &s->err)) < 0
        || PK(mlu_pkw_op(&s->pk, MLU_PK_BINPERSID, &s->err)) < 0
        || PK(mlu_pkw_int(&s->pk, d->offset, &s->err)) < 0
        || save_int_tuple(s, d->size, d->ndim) < 0
        || save_int_tuple(s, d->stride, d->ndim) < 0
        || PK(mlu_pkw_bool(&s->pk, d->requires_grad, &s->err)) < 0
        /* backward hooks: OrderedDict() */
        || put_global(s, G_ODICT) < 0
        || PK(mlu_pkw_op(&s->pk, MLU_PK_EMPTY_TUPLE, &s->err)) < 0
        || PK(mlu_pkw_op(&s->pk, MLU_PK_REDUCE, &s->err)) < 0
        || PK(mlu_pkw_put(&s->pk, NULL, &s->err)) < 0)
        return -1;
    if (v3 && put_global(s, G_DTYPE0 + d->dt) < 0)
        return -1;
    if (d->metadata != NULL && save_obj(s, d->metadata, NULL) < 0)
        return -1;
    if (PK(mlu_pkw_op(&s->pk, MLU_PK_TUPLE, &s->err)) < 0 || PK(mlu_pkw_put(&s->pk, NULL, &s->err)) < 0
        || PK(mlu_pkw_op(&s->pk, MLU_PK_REDUCE, &s->err)) < 0)
        return -1;
    return memo_put(s, obj);
}

/* Reads a tuple of ints into a new array (mlu_free); NULL with an exception on error. */
static int64_t *int_array(PyObject *t, Py_ssize_t *n)
{
    PyObject *seq = PySequence_Fast(t, "expected a sequence of ints");
    int64_t *v = NULL;
    Py_ssize_t i, len;

    if (seq == NULL)
        return NULL;
    len = PySequence_Fast_GET_SIZE(seq);
    v = mlu_malloc((size_t)(len > 0 ? len : 1) * sizeof(int64_t));
    if (v == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (i = 0; i < len; i++) {
        long long x = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(seq, i));
        if (x == -1 && PyErr_Occurred()) {
            mlu_free(v);
            v = NULL;
            goto done;
        }
        v[i] = x;
    }
    *n = len;
done:
    Py_DECREF(seq);
    return v;
}

/* Re-raises the pending exception of the same type with the path appended. */
static int add_path(const path_step *at)
{
    PyObject *type, *value, *tb, *where;

    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    where = mlu_path_string("obj", at);
    if (where != NULL && value != NULL
        && (PyErr_GivenExceptionMatches(type, PyExc_TypeError)
            || PyErr_GivenExceptionMatches(type, PyExc_ValueError))) {
        PyObject *cause = value;
        PyErr_Format(type, "%S at %U", value, where);
        {
            PyObject *t2, *v2, *tb2;
            PyErr_Fetch(&t2, &v2, &tb2);
            PyErr_NormalizeException(&t2, &v2, &tb2);
            PyException_SetCause(v2, cause); /* steals cause */
            PyErr_Restore(t2, v2, tb2);
        }
        Py_XDECREF(type);
        Py_XDECREF(tb);
    } else {
        PyErr_Restore(type, value, tb);
    }
    Py_XDECREF(where);
    return -1;
}

static int save_torch(saver *s, PyObject *t, const path_step *at);

/* describe(t) -> ("tensor", dtype, size, stride, offset, requires_grad,
 *                 storage_id, storage, nbytes, metadata or None)
 *              | ("param", data, requires_grad) */
static int save_torch(saver *s, PyObject *t, const path_step *at)
{
    PyObject *desc = PyObject_CallOneArg(s->describe, t);
    tensor_desc d;
    Py_ssize_t n2 = 0;
    const char *kind, *dname;
    int rc = -1;

    memset(&d, 0, sizeof(d));
    if (desc == NULL)
        return add_path(at);
    if (!PyTuple_Check(desc) || PyTuple_GET_SIZE(desc) < 3) {
        PyErr_SetString(PyExc_SystemError, "ptsave: bad tensor description");
        goto done;
    }
    kind = PyUnicode_AsUTF8(PyTuple_GET_ITEM(desc, 0));
    if (kind == NULL)
        goto done;
    if (strcmp(kind, "param") == 0) {
        /* _rebuild_parameter(data, requires_grad, OrderedDict()) */
        int rg = PyObject_IsTrue(PyTuple_GET_ITEM(desc, 2));
        if (rg < 0 || put_global(s, G_REBUILD_PARAM) < 0)
            goto done;
        if (save_torch(s, PyTuple_GET_ITEM(desc, 1), at) < 0)
            goto done;
        if (PK(mlu_pkw_bool(&s->pk, rg, &s->err)) < 0 || put_global(s, G_ODICT) < 0
            || PK(mlu_pkw_op(&s->pk, MLU_PK_EMPTY_TUPLE, &s->err)) < 0
            || PK(mlu_pkw_op(&s->pk, MLU_PK_REDUCE, &s->err)) < 0
            || PK(mlu_pkw_put(&s->pk, NULL, &s->err)) < 0
            || PK(mlu_pkw_op(&s->pk, MLU_PK_TUPLE3, &s->err)) < 0
            || PK(mlu_pkw_put(&s->pk, NULL, &s->err)) < 0
            || PK(mlu_pkw_op(&s->pk, MLU_PK_REDUCE, &s->err)) < 0)
            goto done;
        rc = memo_put(s, t);
        goto done;
    }
    if (PyTuple_GET_SIZE(desc) != 10) {
        PyErr_SetString(PyExc_SystemError, "ptsave: bad tensor description");
        goto done;
    }
    dname = PyUnicode_AsUTF8(PyTuple_GET_ITEM(desc, 1));
    if (dname == NULL)
        goto done;
    d.dt = dtype_index(dname);
    if (d.dt < 0) {
        mlu_path_fail(PyExc_TypeError, "obj", at, "tensors of dtype torch.%s cannot be saved", dname);
        goto done;
    }
    d.size = int_array(PyTuple_GET_ITEM(desc, 2), &d.ndim);
    if (d.size == NULL)
        goto done;
    d.stride = int_array(PyTuple_GET_ITEM(desc, 3), &n2);
    if (d.stride == NULL)
        goto done;
    if (n2 != d.ndim) {
        PyErr_SetString(PyExc_SystemError, "ptsave: size and stride differ in length");
        goto done;
    }
    d.offset = PyLong_AsLongLong(PyTuple_GET_ITEM(desc, 4));
    if (d.offset == -1 && PyErr_Occurred())
        goto done;
    d.requires_grad = PyObject_IsTrue(PyTuple_GET_ITEM(desc, 5));
    if (d.requires_grad < 0)
        goto done;
    {
        unsigned long long nbytes = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(desc, 8));
        const dtype_info *di = &DTYPES[d.dt];
        if (nbytes == (unsigned long long)-1 && PyErr_Occurred())
            goto done;
        if (di->storage != NULL && nbytes % (unsigned long long)di->elsize != 0) {
            mlu_path_fail(PyExc_ValueError, "obj", at, "storage of %llu bytes is not a whole number of %s elements",
                    nbytes, di->name);
            goto done;
        }
        d.storage = find_storage(s, s->tmap, PyTuple_GET_ITEM(desc, 6), PyTuple_GET_ITEM(desc, 7), NULL,
                                 nbytes, 1, di->storage != NULL ? d.dt : dtype_index("uint8"), at);
        if (d.storage < 0)
            goto done;
        if (s->st[d.storage].nbytes != nbytes) {
            mlu_path_fail(PyExc_ValueError, "obj", at, "a shared storage changed size while saving");
            goto done;
        }
    }
    if (PyTuple_GET_ITEM(desc, 9) != Py_None)
        d.metadata = PyTuple_GET_ITEM(desc, 9);
    rc = emit_tensor(s, t, &d);
done:
    mlu_free(d.size);
    mlu_free(d.stride);
    Py_XDECREF(desc);
    return rc;
}

/* The dtype index of a NumPy dtype, -1 when torch has no equivalent. */
static int numpy_dtype(PyArray_Descr *descr)
{
    int es = (int)PyDataType_ELSIZE(descr);

    if (descr->type_num >= NPY_USERDEF) {
        const char *mod = descr->typeobj->tp_name;
        static const char *ml[] = {"bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                                   "float8_e5m2fnuz", "float8_e8m0fnu"};
        size_t i;
        /* ml_dtypes' scalar types are named "ml_dtypes.<name>". */
        if (strncmp(mod, "ml_dtypes.", 10) != 0)
            return -1;
        for (i = 0; i < sizeof(ml) / sizeof(ml[0]); i++)
            if (strcmp(mod + 10, ml[i]) == 0) {
                int k = dtype_index(ml[i]);
                return DTYPES[k].elsize == es ? k : -1;
            }
        return -1;
    }
    switch (descr->kind) {
    case 'b':
        return es == 1 ? dtype_index("bool") : -1;
    case 'i':
        return es == 1 ? dtype_index("int8") : es == 2 ? dtype_index("int16")
             : es == 4 ? dtype_index("int32") : es == 8 ? dtype_index("int64") : -1;
    case 'u':
        return es == 1 ? dtype_index("uint8") : es == 2 ? dtype_index("uint16")
             : es == 4 ? dtype_index("uint32") : es == 8 ? dtype_index("uint64") : -1;
    case 'f':
        return es == 2 ? dtype_index("float16") : es == 4 ? dtype_index("float32")
             : es == 8 ? dtype_index("float64") : -1;
    case 'c':
        return es == 8 ? dtype_index("complex64") : es == 16 ? dtype_index("complex128") : -1;
    default:
        return -1;
    }
}

static int save_array(saver *s, PyArrayObject *a, const path_step *at)
{
    PyArray_Descr *descr = PyArray_DESCR(a);
    PyArrayObject *root = a, *copy = NULL;
    PyObject *ident = NULL;
    tensor_desc d;
    int64_t es;
    Py_ssize_t i;
    int rc = -1, ok;

    memset(&d, 0, sizeof(d));
    d.dt = numpy_dtype(descr);
    if (d.dt < 0) {
        PyObject *dn = PyObject_Str((PyObject *)descr);
        if (dn != NULL) {
            mlu_path_fail(PyExc_TypeError, "obj", at, "NumPy arrays of dtype %U have no torch equivalent", dn);
            Py_DECREF(dn);
        }
        return -1;
    }
    es = DTYPES[d.dt].elsize;
    if (!PyArray_ISNOTSWAPPED(a)) {
        /* Byte-swapped data: torch wants native order, so this one is copied. */
        PyArray_Descr *native = PyArray_DescrNewByteorder(descr, NPY_NATIVE); /* new ref */
        if (native == NULL)
            return -1;
        copy = (PyArrayObject *)PyArray_FromAny((PyObject *)a, native, 0, 0,
                                                NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ENSURECOPY, NULL);
        if (copy == NULL)
            return -1;
        root = copy;
    } else {
        while (PyArray_BASE(root) != NULL && PyArray_Check(PyArray_BASE(root)))
            root = (PyArrayObject *)PyArray_BASE(root);
    }
    d.ndim = PyArray_NDIM(a);
    d.size = mlu_malloc((size_t)(d.ndim > 0 ? d.ndim : 1) * sizeof(int64_t));
    d.stride = mlu_malloc((size_t)(d.ndim > 0 ? d.ndim : 1) * sizeof(int64_t));
    if (d.size == NULL || d.stride == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    /* Is `a` a view torch can express inside root's whole buffer? */
    for (;;) {
        const char *base = PyArray_BYTES(root), *p = PyArray_BYTES(copy ? copy : a);
        PyArrayObject *v = copy ? copy : a;
        uint64_t nbytes = (uint64_t)PyArray_NBYTES(root);
        int64_t off = (int64_t)(p - base), last = 0;
        ok = (PyArray_IS_C_CONTIGUOUS(root) || PyArray_IS_F_CONTIGUOUS(root))
             && off >= 0 && off % es == 0 && nbytes % (uint64_t)es == 0;
        for (i = 0; ok && i < d.ndim; i++) {
            npy_intp st = PyArray_STRIDES(v)[i], dim = PyArray_DIMS(v)[i];
            d.size[i] = dim;
            if (st < 0 || st % es != 0) {
                ok = 0;
                break;
            }
            d.stride[i] = st / es;
            if (dim > 0)
                last += (int64_t)(dim - 1) * st;
        }
        if (ok && PyArray_SIZE(v) > 0 && (uint64_t)(off + last + es) > nbytes)
            ok = 0;
        if (ok) {
            d.offset = off / es;
            ident = PyLong_FromVoidPtr(root);
            if (ident == NULL)
                goto done;
            d.storage = find_storage(s, s->nmap, ident, (PyObject *)root, base, nbytes, 0,
                                     DTYPES[d.dt].storage != NULL ? d.dt : dtype_index("uint8"), at);
            if (d.storage < 0)
                goto done;
            break;
        }
        if (copy != NULL) {
            PyErr_SetString(PyExc_SystemError, "ptsave: a contiguous copy is not contiguous");
            goto done;
        }
        /* Negative or odd strides, or memory outside the root: write a copy. */
        copy = (PyArrayObject *)PyArray_NewCopy(a, NPY_CORDER);
        if (copy == NULL)
            goto done;
        root = copy;
    }
    rc = emit_tensor(s, (PyObject *)a, &d);
done:
    Py_XDECREF(ident);
    Py_XDECREF(copy);
    mlu_free(d.size);
    mlu_free(d.stride);
    return rc;
}

/* ------------------------------------------------------------------ dispatch */

/* True for scalars of the ml_dtypes float types (bfloat16, float8_*). */
static int scalar_is_ml_float(PyObject *o)
{
    PyArray_Descr *descr = PyArray_DescrFromScalar(o); /* new ref */
    int r;

    if (descr == NULL) {
        PyErr_Clear();
        return 0;
    }
    r = descr->type_num >= NPY_USERDEF && numpy_dtype(descr) >= 0;
    Py_DECREF(descr);
    return r;
}

static int save_obj_inner(saver *s, PyObject *o, const path_step *at)
{
    PyTypeObject *tp = Py_TYPE(o);
    int r;

    if (o == Py_None)
        return PK(mlu_pkw_op(&s->pk, MLU_PK_NONE, &s->err));
    if (o == Py_True || o == Py_False)
        return PK(mlu_pkw_bool(&s->pk, o == Py_True, &s->err));
    if (PyLong_CheckExact(o))
        return save_long(s, o, at);
    if (PyFloat_Check(o))
        return PK(mlu_pkw_float(&s->pk, PyFloat_AS_DOUBLE(o), &s->err));
    r = memo_get(s, o);
    if (r != 0)
        return r < 0 ? -1 : 0;
    if (PyUnicode_CheckExact(o))
        return save_str(s, o, at);
    if (tp == &PyTuple_Type)
        return save_tuple(s, o, at);
    if (tp == &PyDict_Type)
        return save_dict(s, o, at, 0);
    if (tp == &PyList_Type)
        return save_list(s, o, at);
    if ((PyObject *)tp == s->odict_type)
        return save_odict(s, o, at);
    if (s->tensor_type != NULL) {
        r = PyObject_IsInstance(o, s->tensor_type);
        if (r < 0)
            return -1;
        if (r)
            return save_torch(s, o, at);
    }
    if (PyArray_Check(o)) {
        /* np.memmap is an ndarray with a file behind it; other subclasses
         * (masked arrays, matrices) carry meaning a tensor would lose. */
        if (!PyArray_CheckExact(o) && strcmp(tp->tp_name, "memmap") != 0)
            return mlu_path_fail(PyExc_TypeError, "obj", at, "cannot save an ndarray subclass %s", tp->tp_name);
        return save_array(s, (PyArrayObject *)o, at);
    }
    if (PyUnicode_Check(o) || PyArray_IsScalar(o, Generic)) {
        /* NumPy scalars (and str subclasses) become plain Python values. */
        PyObject *plain = NULL;
        if (PyUnicode_Check(o))
            plain = PyUnicode_FromObject(o);
        else if (PyArray_IsScalar(o, Bool))
            plain = PyBool_FromLong(PyObject_IsTrue(o));
        else if (PyArray_IsScalar(o, Integer))
            plain = PyNumber_Index(o);
        else if (PyArray_IsScalar(o, Floating) || scalar_is_ml_float(o))
            plain = PyNumber_Float(o);
        else
            return mlu_path_fail(PyExc_TypeError, "obj", at, "cannot save an object of type %s", tp->tp_name);
        if (plain == NULL)
            return -1;
        r = save_obj(s, plain, at);
        Py_DECREF(plain);
        return r;
    }
    return mlu_path_fail(PyExc_TypeError, "obj", at, "cannot save an object of type %s", tp->tp_name);
}

static int save_obj(saver *s, PyObject *o, const path_step *at)
{
    int rc;

    if (Py_EnterRecursiveCall(" while saving a .pt file"))
        return -1;
    rc = save_obj_inner(s, o, at);
    Py_LeaveRecursiveCall();
    return rc;
}

/* ------------------------------------------------------------------ writing */

typedef struct file_sink {
    mlu_afile f;
    uint64_t flushed;   /* bytes already handed to writeback */
} file_sink;

/* Start writeback every this many bytes, so the fsync at commit finds most
 * of the file already on its way to the disk (durable saves only: without
 * the fsync it would only slow the save down). */
#define WRITEBACK_STEP ((uint64_t)64 << 20)

static mlu_status sink_file(void *ctx, const void *p, size_t n, mlu_error *err)
{
    file_sink *fs = ctx;
    mlu_status st = mlu_afile_write(&fs->f, p, n, err);

#ifdef __linux__
    if (st == MLU_OK && (fs->f.flags & MLU_AFILE_DURABLE)
        && fs->f.written - fs->flushed >= WRITEBACK_STEP) {
        /* advisory: a failure here only means the fsync does all the work */
        (void)sync_file_range(fs->f.fd, (off64_t)fs->flushed, (off64_t)(fs->f.written - fs->flushed),
                              SYNC_FILE_RANGE_WRITE);
        fs->flushed = fs->f.written;
    }
#endif
    return st;
}

/* A bytes object sized from archive_bound, filled in place. */
typedef struct bytes_sink {
    char *p;     /* borrowed: the bytes object's buffer */
    size_t len, cap;
} bytes_sink;

static mlu_status sink_bytes(void *ctx, const void *p, size_t n, mlu_error *err)
{
    bytes_sink *b = ctx;

    if (n > b->cap - b->len)
        return mlu_error_set(err, MLU_EOVERFLOW, -1, "archive outgrew its computed size");
    memcpy(b->p + b->len, p, n);
    b->len += n;
    return MLU_OK;
}

/* An upper bound of the archive's size (records, headers, padding, central
 * directory, end records); -1 with OverflowError when it does not fit. */
static int archive_bound(const saver *s, size_t prefix_len, size_t *out)
{
    /* local header + name + zip64 extra + FB field and padding + descriptor
     * + central header + name + zip64 extra, for a name of up to 32 bytes */
    size_t per = 30 + (prefix_len + 32) + 28 + 4 + 255 + 24 + 46 + (prefix_len + 32) + 28;
    size_t total = 98 + 6 * per + 16, add;
    Py_ssize_t i;
    int bad = mlu_add_overflow_size(total, s->pk.buf.len, &total);

    for (i = 0; i < s->nst && !bad; i++) {
        bad |= s->st[i].nbytes > (uint64_t)SIZE_MAX;
        bad |= mlu_add_overflow_size((size_t)s->st[i].nbytes, per, &add);
        bad |= mlu_add_overflow_size(total, add, &total);
    }
    if (bad || total > (size_t)PY_SSIZE_T_MAX) {
        PyErr_SetString(PyExc_OverflowError, "the archive is too large to build in memory");
        return -1;
    }
    *out = total;
    return 0;
}

/* The `.data/serialization_id` record torch.save ends with. */
static int add_serialization_id(saver *s, mlu_zipw *zw)
{
    const char **names = mlu_malloc((zw->count ? zw->count : 1) * sizeof(char *));
    uint32_t *crcs = mlu_malloc((zw->count ? zw->count : 1) * sizeof(uint32_t));
    uint64_t *sizes = mlu_malloc((zw->count ? zw->count : 1) * sizeof(uint64_t));
    char id[41];
    size_t i;
    mlu_status st = MLU_ENOMEM;
    int rc = -1;

    if (names == NULL || crcs == NULL || sizes == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (i = 0; i < zw->count; i++) {
        names[i] = zw->entries[i].name + zw->prefix_len;
        crcs[i] = zw->entries[i].crc;
        sizes[i] = zw->entries[i].size;
    }
    st = mlu_pt_serialization_id(names, crcs, sizes, zw->count, id, &s->err);
    if (st == MLU_ENOTSUP) {
        /* optional for readers: left out past what the id computation covers */
        mlu_error_clear(&s->err);
        rc = 0;
        goto done;
    }
    if (st != MLU_OK) {
        core_fail(s);
        goto done;
    }
    rc = PK(mlu_zipw_record(zw, ".data/serialization_id", id, 40, &s->err));
done:
    mlu_free(names);
    mlu_free(crcs);
    mlu_free(sizes);
    return rc;
}

/* Writes the whole archive through zw.  storage_bytes(storage) -> (keepalive,
 * address, nbytes) gives a torch storage's CPU bytes (copied off a device). */
static int write_zip(saver *s, mlu_zipw *zw, PyObject *storage_bytes)
{
    static const char order[] = MLU_HOST_BYTEORDER;
    PyObject *got = NULL;  /* owned: the current torch storage's (keepalive, address, nbytes) */
    Py_ssize_t i;
    mlu_status st;
    char name[48];
    int rc = -1;

    if (PK(mlu_zipw_record(zw, "data.pkl", s->pk.buf.data, s->pk.buf.len, &s->err)) < 0
        || PK(mlu_zipw_record(zw, ".format_version", "1", 1, &s->err)) < 0
        || PK(mlu_zipw_record(zw, ".storage_alignment", "64", 2, &s->err)) < 0
        || PK(mlu_zipw_record(zw, "byteorder", order, sizeof(order) - 1, &s->err)) < 0)
        goto done;
    for (i = 0; i < s->nst; i++) {
        storage_rec *r = &s->st[i];
        const char *data = r->data;
        uint64_t n = r->nbytes;

        if (r->is_torch) {
            unsigned long long addr, nb;
            got = PyObject_CallOneArg(storage_bytes, r->owner);
            if (got == NULL)
                goto done;
            if (!PyTuple_Check(got) || PyTuple_GET_SIZE(got) != 3) {
                PyErr_SetString(PyExc_SystemError, "ptsave: bad storage bytes");
                goto done;
            }
            addr = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(got, 1));
            nb = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(got, 2));
            if (PyErr_Occurred())
                goto done;
            if (nb != n) {
                PyErr_Format(PyExc_ValueError, "storage %zd changed size while saving (%llu bytes, then %llu)",
                             i, (unsigned long long)n, nb);
                goto done;
            }
            data = (const char *)(uintptr_t)addr;
        }
        snprintf(name, sizeof(name), "data/%zd", i);
        Py_BEGIN_ALLOW_THREADS
        st = mlu_zipw_begin(zw, name, n, &s->err);
        if (st == MLU_OK && n > 0)
            st = mlu_zipw_payload(zw, data, (size_t)n, &s->err);
        if (st == MLU_OK)
            st = mlu_zipw_end(zw, &s->err);
        Py_END_ALLOW_THREADS
        Py_CLEAR(got);
        if (st != MLU_OK) {
            core_fail(s);
            goto done;
        }
    }
    if (PK(mlu_zipw_record(zw, "version", "3\n", 2, &s->err)) < 0)
        goto done;
    if (add_serialization_id(s, zw) < 0)
        goto done;
    Py_BEGIN_ALLOW_THREADS
    st = mlu_zipw_finish(zw, &s->err);
    Py_END_ALLOW_THREADS
    if (st != MLU_OK) {
        core_fail(s);
        goto done;
    }
    rc = 0;
done:
    Py_XDECREF(got);
    return rc;
}

static void saver_free(saver *s)
{
    Py_ssize_t i;

    for (i = 0; i < s->nst; i++) {
        Py_XDECREF(s->st[i].key);
        Py_XDECREF(s->st[i].owner);
    }
    mlu_free(s->st);
    s->st = NULL;
    s->nst = 0;
    mlu_pkw_free(&s->pk);
    Py_CLEAR(s->memo);
    Py_CLEAR(s->keep);
    Py_CLEAR(s->tmap);
    Py_CLEAR(s->nmap);
    Py_CLEAR(s->s_storage);
    Py_CLEAR(s->s_cpu);
    Py_CLEAR(s->odict_type);
}

static int saver_init(saver *s, PyObject *tensor_type, PyObject *describe)
{
    PyObject *collections;
    int g;

    memset(s, 0, sizeof(*s));
    mlu_pkw_init(&s->pk);
    mlu_error_clear(&s->err);
    for (g = 0; g < G_COUNT; g++)
        s->gmemo[g] = -1;
    s->tensor_type = tensor_type == Py_None ? NULL : tensor_type;
    s->describe = describe;
    s->memo = PyDict_New();
    s->keep = PyList_New(0);
    s->tmap = PyDict_New();
    s->nmap = PyDict_New();
    s->s_storage = PyUnicode_InternFromString("storage");
    s->s_cpu = PyUnicode_InternFromString("cpu");
    collections = PyImport_ImportModule("collections");
    if (collections != NULL) {
        s->odict_type = PyObject_GetAttrString(collections, "OrderedDict");
        Py_DECREF(collections);
    }
    if (s->memo == NULL || s->keep == NULL || s->tmap == NULL || s->nmap == NULL
        || s->s_storage == NULL || s->s_cpu == NULL || s->odict_type == NULL)
        return -1;
    return 0;
}

/* _ptsave_write(obj, path, archive, tensor_type, describe, storage_bytes, zip64_limit=0xFFFFFFFF,
 *               *, durable=True)
 * path: bytes (the file, written atomically; fsynced when durable) or None
 * (return the bytes). */
static PyObject *ptsave_write(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"obj", "path", "archive", "tensor_type", "describe", "storage_bytes",
                             "zip64_limit", "durable", NULL};
    PyObject *obj, *path, *tensor_type, *describe, *storage_bytes, *res = NULL;
    PyObject *durable = Py_True; /* borrowed */
    const char *archive;
    unsigned long long limit = MLU_ZIP64_LIMIT;
    saver s;
    mlu_zipw zw;
    file_sink fs;
    bytes_sink mem = {NULL, 0, 0};
    PyObject *out = NULL;
    int have_file = 0, have_zip = 0;
    path_step root = {NULL, NULL, 0, 0};
    mlu_status st;

    (void)module;
    memset(&zw, 0, sizeof(zw));
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOsOOO|K$O!:_ptsave_write", kwlist, &obj, &path,
                                     &archive, &tensor_type, &describe, &storage_bytes, &limit,
                                     &PyBool_Type, &durable))
        return NULL;
    if (path != Py_None && !PyBytes_Check(path)) {
        PyErr_SetString(PyExc_TypeError, "path must be bytes or None");
        return NULL;
    }
    if (limit < 1) {
        PyErr_SetString(PyExc_ValueError, "zip64_limit must be positive");
        return NULL;
    }
    if (saver_init(&s, tensor_type, describe) < 0)
        goto done;
    if (mlu_pkw_proto(&s.pk, &s.err) != MLU_OK || save_obj(&s, obj, &root) < 0)
        goto error_core;
    if (mlu_pkw_op(&s.pk, MLU_PK_STOP, &s.err) != MLU_OK)
        goto error_core;
    if (path != Py_None) {
        const char *p = PyBytes_AS_STRING(path);
        Py_BEGIN_ALLOW_THREADS
        fs.flushed = 0;
        st = mlu_afile_open(&fs.f, p, durable == Py_True ? MLU_AFILE_DURABLE : 0u, &s.err);
        Py_END_ALLOW_THREADS
        if (st != MLU_OK) {
            core_fail(&s);
            goto done;
        }
        have_file = 1;
    } else {
        size_t bound;
        if (archive_bound(&s, strlen(archive) + 1, &bound) < 0)
            goto done;
        out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)bound);
        if (out == NULL)
            goto done;
        mem.p = PyBytes_AS_STRING(out);
        mem.cap = bound;
    }
    if (mlu_zipw_init(&zw, archive, have_file ? sink_file : sink_bytes,
                      have_file ? (void *)&fs : (void *)&mem, &s.err) != MLU_OK) {
        core_fail(&s);
        goto done;
    }
    have_zip = 1;
    zw.zip64_limit = limit;
    if (write_zip(&s, &zw, storage_bytes) < 0)
        goto done;
    if (have_file) {
        Py_BEGIN_ALLOW_THREADS
        st = mlu_afile_commit(&fs.f, &s.err);
        Py_END_ALLOW_THREADS
        have_file = 0;
        if (st != MLU_OK) {
            core_fail(&s);
            goto done;
        }
        res = Py_NewRef(Py_None);
    } else {
        if (_PyBytes_Resize(&out, (Py_ssize_t)mem.len) < 0)
            goto done; /* out was freed */
        res = out;
        out = NULL;
    }
    goto done;
error_core:
    if (!PyErr_Occurred())
        core_fail(&s);
done:
    if (have_file)
        mlu_afile_abort(&fs.f);
    if (have_zip)
        mlu_zipw_free(&zw);
    Py_XDECREF(out);
    saver_free(&s);
    return res;
}

static PyObject *ptsave_padding(PyObject *module, PyObject *args)
{
    unsigned long long offset, size, limit = MLU_ZIP64_LIMIT;
    Py_ssize_t name_len;
    unsigned int alignment = MLU_ZIP_ALIGNMENT;

    (void)module;
    if (!PyArg_ParseTuple(args, "KnK|IK:_ptsave_padding", &offset, &name_len, &size, &alignment, &limit))
        return NULL;
    if (name_len < 0) {
        PyErr_SetString(PyExc_ValueError, "name_len must not be negative");
        return NULL;
    }
    return PyLong_FromUnsignedLong(mlu_zip_padding(offset, (size_t)name_len, size, alignment, limit));
}

static PyMethodDef ptsave_methods[] = {
    {"_ptsave_write", (PyCFunction)(void (*)(void))ptsave_write, METH_VARARGS | METH_KEYWORDS,
     "_ptsave_write(obj, path, archive, tensor_type, describe, storage_bytes, zip64_limit=0xFFFFFFFF, *, "
     "durable=True)\n"
     "--\n\nWrites obj as a torch.save zip archive to path (atomically; fsynced when durable), or returns "
     "the bytes when path is None."},
    {"_ptsave_padding", ptsave_padding, METH_VARARGS,
     "_ptsave_padding(offset, name_len, size, alignment=64, zip64_limit=0xFFFFFFFF)\n"
     "--\n\nThe FB padding torch puts in a record's local header."},
    {NULL, NULL, 0, NULL},
};

int mlu_ptsave_module_init(PyObject *m)
{
    return PyModule_AddFunctions(m, ptsave_methods);
}
