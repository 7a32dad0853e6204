/* ptsave.c: the Python face of PyTorch .pt saving.
 *
 * _ptsave_write walks a Python object (dicts, OrderedDicts with their
 * attributes, lists, tuples, plain values, torch tensors and NumPy arrays)
 * and hands the format writer (core/ptwrite.c) plain descriptors: containers
 * and their item counts, strings, numbers, tensors (dtype, shape, strides,
 * offset, storage) and storages.  The writer owns every rule of the format
 * (opcodes, batches, the tensor's persistent id, the dtype table, the archive
 * layout); this file keeps what only Python knows: which objects are the
 * same (pickle's memo is by identity), where a storage's bytes are, and the
 * path to name in an error.  Every storage's bytes go straight from the
 * tensor's memory to the file, GIL released.
 *
 * What is torch-specific to ask of a tensor is asked through two Python
 * callables from mlutils._ptsave (describe, storage_bytes), so nothing here
 * needs torch to be importable. */
#include "npy.h"
#include "path.h"

#include "../core/alloc.h"
#include "../core/pickle_read.h"
#include "../core/ptwrite.h"

/* ------------------------------------------------------------------ state */

typedef struct storage_rec {
    PyObject *key;        /* owned: the key string ("0", "1", ...), memoized by identity as pickle does */
    PyObject *owner;      /* owned: torch storage, or the NumPy array holding the bytes */
    int is_torch;
} storage_rec;

typedef mlu_path path_step; /* see path.h */

typedef struct saver {
    mlu_state *mst;         /* borrowed: the module's state */
    mlu_ptw w;              /* owned: the format writer (pickle, storages, archive) */
    mlu_error err;
    PyObject *memo;         /* owned dict: id(obj) -> memo index */
    PyObject *keep;         /* owned list: every memoized object, so ids stay unique */
    PyObject *tmap;         /* owned dict: torch storage identity -> storage index */
    PyObject *nmap;         /* owned dict: id(NumPy root) -> storage index */
    storage_rec *st;        /* owned; st[i] goes with the writer's storage i */
    Py_ssize_t nst;
    size_t cap;             /* allocated entries of st */
    PyObject *s_storage;    /* owned, interned "storage" */
    PyObject *s_cpu;        /* owned, interned "cpu" */
    PyObject *odict_type;   /* owned: collections.OrderedDict */
    PyObject *tensor_type;  /* borrowed: torch.Tensor, or NULL when torch is not loaded */
    PyObject *describe;     /* borrowed */
    PyObject *file;         /* borrowed: the path as given once the file is being written, else NULL */
    int depth;              /* how deep below the root the value being saved is */
    unsigned met;           /* MET_* of the shared constants saved so far */
} saver;

/* None, True, False and (): the reader's VM holds one node of each, which it
 * converts where it first meets it (see save_obj). */
enum { MET_NONE = 1, MET_TRUE = 2, MET_FALSE = 4, MET_EMPTY_TUPLE = 8 };

/* ------------------------------------------------------------------ errors */

/* An OSError of the file being written names it as open() does. */
static int core_fail(saver *s)
{
    mlu_raise_write(s->mst, &s->err, MLU_DOMAIN_VALUE, s->file);
    return -1;
}

#define PK(call) ((call) == MLU_OK ? 0 : core_fail(s))

/* A refusal of the format writer (MLU_EINVAL) as a ValueError naming the path. */
static int core_fail_at(saver *s, const path_step *at)
{
    if (s->err.code == MLU_EINVAL)
        return mlu_path_fail(PyExc_ValueError, "obj", at, "%s", s->err.text);
    return core_fail(s);
}

/* ------------------------------------------------------------------ memo */

/* Records obj under the memo index the writer just put. */
static int memo_record(saver *s, PyObject *obj, uint32_t idx)
{
    PyObject *key = NULL, *val = NULL;
    int rc = -1;

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

/* 1 and *idx when obj was memoized, 0 when not, -1 on error. */
static int memo_lookup(saver *s, PyObject *obj, uint32_t *idx)
{
    PyObject *key = PyLong_FromVoidPtr(obj), *val;
    unsigned long v;

    if (key == NULL)
        return -1;
    val = PyDict_GetItemWithError(s->memo, key); /* borrowed */
    Py_DECREF(key);
    if (val == NULL)
        return PyErr_Occurred() ? -1 : 0;
    v = PyLong_AsUnsignedLong(val);
    if (v == (unsigned long)-1 && PyErr_Occurred())
        return -1;
    *idx = (uint32_t)v;
    return 1;
}

/* 1 and a BINGET written when obj was memoized, 0 when not, -1 on error. */
static int memo_get(saver *s, PyObject *obj)
{
    uint32_t idx;
    int r = memo_lookup(s, obj, &idx);

    if (r <= 0)
        return r;
    return PK(mlu_ptw_get(&s->w, idx, &s->err)) < 0 ? -1 : 1;
}

/* ------------------------------------------------------------------ values */

static int save_obj(saver *s, PyObject *o, const path_step *at);
static int save_child(saver *s, PyObject *o, const path_step *at);

static int save_str(saver *s, PyObject *o, const path_step *at)
{
    Py_ssize_t n;
    const char *p;
    PyObject *enc = NULL;
    uint32_t idx = 0;
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
    rc = PK(mlu_ptw_str(&s->w, p, (size_t)n, &idx, &s->err));
    Py_XDECREF(enc);
    if (rc == 0)
        rc = memo_record(s, o, idx);
    return rc;
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
        return PK(mlu_ptw_int(&s->w, (int64_t)v, &s->err));
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
        rc = PK(mlu_ptw_long_bytes(&s->w, b, (size_t)nb, &s->err));
    }
done:
    Py_XDECREF(nbits);
    Py_XDECREF(bytes);
    return rc;
}

/* The items of a dict or OrderedDict, a list of (key, value) pairs, in the
 * container seq the writer batches (SETITEM(S), as the pickler does). */
static int save_items(saver *s, mlu_ptw_seq *seq, PyObject *items, const path_step *at, int attr)
{
    Py_ssize_t n = PyList_GET_SIZE(items), j;

    for (j = 0; j < n; j++) {
        PyObject *kv = PyList_GET_ITEM(items, j);
        PyObject *k = PyTuple_GET_ITEM(kv, 0), *v = PyTuple_GET_ITEM(kv, 1);
        path_step step = {at, k, j, attr};
        if (PK(mlu_ptw_item(&s->w, seq, &s->err)) < 0 || save_child(s, k, &step) < 0 || save_child(s, v, &step) < 0)
            return -1;
    }
    return PK(mlu_ptw_seq_end(&s->w, seq, NULL, &s->err));
}

static int save_dict(saver *s, PyObject *d, const path_step *at, int attr)
{
    PyObject *items = PyDict_Items(d);
    mlu_ptw_seq seq;
    uint32_t idx = 0;
    int rc = -1;

    if (items == NULL)
        return -1;
    if (PK(mlu_ptw_dict_begin(&s->w, &seq, (size_t)PyList_GET_SIZE(items), &idx, &s->err)) < 0
        || memo_record(s, d, idx) < 0)
        goto done;
    rc = save_items(s, &seq, items, at, attr);
done:
    Py_DECREF(items);
    return rc;
}

static int save_odict(saver *s, PyObject *d, const path_step *at)
{
    PyObject *items = NULL, *state = NULL;
    mlu_ptw_seq seq;
    uint32_t idx = 0;
    int rc = -1;

    items = PyMapping_Items(d);
    if (items == NULL || !PyList_Check(items))
        goto done;
    if (PK(mlu_ptw_odict_begin(&s->w, &seq, (size_t)PyList_GET_SIZE(items), &idx, &s->err)) < 0
        || memo_record(s, d, idx) < 0)
        goto done;
    if (save_items(s, &seq, items, at, 0) < 0)
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
        if (PK(mlu_ptw_odict_state(&s->w, &s->err)) < 0)
            goto done;
    }
    rc = 0;
done:
    Py_XDECREF(items);
    Py_XDECREF(state);
    return rc;
}

static int save_list(saver *s, PyObject *l, const path_step *at)
{
    Py_ssize_t n = PyList_GET_SIZE(l), i;
    mlu_ptw_seq seq;
    uint32_t idx = 0;

    if (PK(mlu_ptw_list_begin(&s->w, &seq, (size_t)n, &idx, &s->err)) < 0 || memo_record(s, l, idx) < 0)
        return -1;
    for (i = 0; i < n; i++) {
        PyObject *item;
        path_step step = {at, NULL, i, 0};
        int rc;
        if (i >= PyList_GET_SIZE(l)) {
            PyErr_SetString(PyExc_RuntimeError, "list changed size during save");
            return -1;
        }
        item = PyList_GET_ITEM(l, i);
        Py_INCREF(item);
        rc = PK(mlu_ptw_item(&s->w, &seq, &s->err));
        if (rc == 0)
            rc = save_child(s, item, &step);
        Py_DECREF(item);
        if (rc < 0)
            return -1;
    }
    return PK(mlu_ptw_seq_end(&s->w, &seq, NULL, &s->err));
}

static int save_tuple(saver *s, PyObject *t, const path_step *at)
{
    Py_ssize_t n = PyTuple_GET_SIZE(t), i;
    mlu_ptw_seq seq;
    uint32_t idx = MLU_PTW_NO_MEMO;
    int r;

    if (PK(mlu_ptw_tuple_begin(&s->w, &seq, (size_t)n, &s->err)) < 0)
        return -1;
    for (i = 0; i < n; i++) {
        path_step step = {at, NULL, i, 0};
        if (PK(mlu_ptw_item(&s->w, &seq, &s->err)) < 0 || save_child(s, PyTuple_GET_ITEM(t, i), &step) < 0)
            return -1;
    }
    r = memo_get(s, t);
    if (r < 0)
        return -1;
    if (r > 0)
        return mlu_path_fail(PyExc_ValueError, "obj", at,
                       "a tuple that contains itself cannot be written in the weights-only format");
    if (PK(mlu_ptw_seq_end(&s->w, &seq, &idx, &s->err)) < 0)
        return -1;
    return idx == MLU_PTW_NO_MEMO ? 0 : memo_record(s, t, idx);
}

/* ------------------------------------------------------------------ tensors */

/* Index of the storage with this identity, registering it the first time.
 * owner: borrowed (a new reference is kept).  dtype: of the tensor viewing it. */
static Py_ssize_t find_storage(saver *s, PyObject *map, PyObject *ident, PyObject *owner,
                               const char *data, uint64_t nbytes, int is_torch, int dtype,
                               const path_step *at)
{
    PyObject *hit = PyDict_GetItemWithError(map, ident); /* borrowed */
    PyObject *num = NULL, *key = NULL;
    storage_rec *r;
    size_t index = 0;
    Py_ssize_t i = -1;

    if (hit != NULL) {
        i = PyLong_AsSsize_t(hit);
        if (i < 0)
            return -1;
        if (mlu_ptw_storage_check(&s->w, (size_t)i, dtype, nbytes, &s->err) != MLU_OK) {
            core_fail_at(s, at);
            return -1;
        }
        return i;
    }
    if (PyErr_Occurred())
        return -1;
    if ((size_t)s->nst == s->cap && mlu_grow((void **)&s->st, &s->cap, s->cap + 1, sizeof(*s->st),
                                             (size_t)PY_SSIZE_T_MAX, "storages", NULL) != MLU_OK) {
        PyErr_NoMemory();
        return -1;
    }
    /* The key is str(len(...)), exactly as torch makes it (the writer writes
     * the same digits; this object is what pickle's memo sees). */
    num = PyLong_FromSsize_t(s->nst);
    key = num ? PyObject_Str(num) : NULL;
    if (key == NULL)
        goto done;
    if (mlu_ptw_storage_add(&s->w, dtype, nbytes, data, &index, &s->err) != MLU_OK) {
        core_fail_at(s, at);
        goto done;
    }
    if (PyDict_SetItem(map, ident, num) < 0)
        goto done;
    r = &s->st[s->nst];
    r->key = key;
    key = NULL;
    Py_INCREF(owner);
    r->owner = owner;
    r->is_torch = is_torch;
    i = s->nst++;
done:
    Py_XDECREF(num);
    Py_XDECREF(key);
    return i;
}

typedef struct tensor_desc {
    int dt;                 /* dtype index (mlu_torch_dtypes) */
    Py_ssize_t ndim;
    int64_t *size;          /* owned by the caller (ndim entries) */
    int64_t *stride;
    int64_t offset;         /* elements */
    int requires_grad;
    Py_ssize_t storage;     /* index */
    PyObject *metadata;     /* borrowed dict or NULL */
    unsigned flags;         /* MLU_PT_FLAG_* of metadata's keys */
} tensor_desc;

/* Sets *flags to the MLU_PT_FLAG_* bits of a tensor's metadata dict
 * (torch's get_tensor_metadata: 'conj' and/or 'neg' with True, written as
 * given) and returns 0; -1 with a ValueError naming where in the object for
 * a key or value the reader refuses (its rule: pickle_read.c tensor_flags),
 * a TypeError for metadata that is no dict. */
static int metadata_flags(PyObject *md, unsigned *flags, const path_step *at)
{
    PyObject *k, *v; /* borrowed */
    Py_ssize_t pos = 0;
    unsigned f = 0;

    if (!PyDict_Check(md))
        return mlu_path_fail(PyExc_TypeError, "obj", at, "tensor metadata is a %s, not a dict", Py_TYPE(md)->tp_name);
    while (PyDict_Next(md, &pos, &k, &v)) {
        unsigned bit = 0;
        if (PyUnicode_Check(k) && PyUnicode_CompareWithASCIIString(k, "conj") == 0)
            bit = MLU_PT_FLAG_CONJ;
        else if (PyUnicode_Check(k) && PyUnicode_CompareWithASCIIString(k, "neg") == 0)
            bit = MLU_PT_FLAG_NEG;
        if (bit == 0 || !PyBool_Check(v))
            return mlu_path_fail(PyExc_ValueError, "obj", at,
                                 "tensor metadata %R: %R cannot be saved (the reader takes only 'conj' and "
                                 "'neg' with bool values)", k, v);
        f |= bit;
    }
    *flags = f;
    return 0;
}

/* Hands the tensor to the writer; the strings of its persistent id share
 * pickle's memo with equal objects met before, as torch.save's pickler does. */
static int emit_tensor(saver *s, PyObject *obj, const tensor_desc *d, const path_step *at)
{
    PyObject *pid_obj[MLU_PTW_PID_COUNT];
    uint32_t pid_memo[MLU_PTW_PID_COUNT], was[MLU_PTW_PID_COUNT], idx = 0;
    mlu_ptw_tensor t;
    int k;

    pid_obj[MLU_PTW_PID_STORAGE] = s->s_storage;
    pid_obj[MLU_PTW_PID_KEY] = s->st[d->storage].key;
    pid_obj[MLU_PTW_PID_CPU] = s->s_cpu;
    for (k = 0; k < MLU_PTW_PID_COUNT; k++) {
        int r = memo_lookup(s, pid_obj[k], &pid_memo[k]);
        if (r < 0)
            return -1;
        if (r == 0)
            pid_memo[k] = MLU_PTW_NO_MEMO;
        was[k] = pid_memo[k];
    }
    t.dtype = d->dt;
    t.ndim = (size_t)d->ndim;
    t.shape = d->size;
    t.stride = d->stride;
    t.offset = d->offset;
    t.requires_grad = d->requires_grad;
    t.flags = d->flags;
    t.storage = (size_t)d->storage;
    if (mlu_ptw_tensor_begin(&s->w, &t, pid_memo, &s->err) != MLU_OK)
        return core_fail_at(s, at); /* a view the reader would refuse: its words, then where */
    for (k = 0; k < MLU_PTW_PID_COUNT; k++)
        if (was[k] == MLU_PTW_NO_MEMO && memo_record(s, pid_obj[k], pid_memo[k]) < 0)
            return -1;
    if (d->metadata != NULL && save_obj(s, d->metadata, NULL) < 0)
        return -1;
    if (PK(mlu_ptw_tensor_end(&s->w, &idx, &s->err)) < 0)
        return -1;
    return memo_record(s, obj, idx);
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

/* New ref: attribute `name` of a description from mlutils._ptsave (a
 * NamedTuple there: the contract is its field names, never positions). */
static PyObject *desc_get(PyObject *desc, const char *name)
{
    return PyObject_GetAttrString(desc, name);
}

/* describe(t) -> _TensorDescription (kind "tensor": dtype, size, stride,
 *                 storage_offset, requires_grad, storage_id, storage, nbytes,
 *                 metadata or None)
 *              | _ParameterDescription (kind "param": data, requires_grad) */
static int save_torch(saver *s, PyObject *t, const path_step *at)
{
    PyObject *desc = PyObject_CallOneArg(s->describe, t);
    PyObject *kind_o = NULL, *f = NULL, *f2 = NULL; /* new refs */
    tensor_desc d;
    Py_ssize_t n2 = 0;
    const char *kind, *dname;
    int rc = -1;

    memset(&d, 0, sizeof(d));
    if (desc == NULL)
        return add_path(at);
    kind_o = desc_get(desc, "kind");
    if (kind_o == NULL)
        goto done;
    kind = PyUnicode_AsUTF8(kind_o);
    if (kind == NULL)
        goto done;
    if (strcmp(kind, "param") == 0) {
        /* _rebuild_parameter(data, requires_grad, OrderedDict()) */
        int rg = 0;
        uint32_t idx = 0;
        if ((f = desc_get(desc, "requires_grad")) == NULL || (rg = PyObject_IsTrue(f)) < 0)
            goto done;
        if (PK(mlu_ptw_param_begin(&s->w, &s->err)) < 0)
            goto done;
        if ((f2 = desc_get(desc, "data")) == NULL || save_torch(s, f2, at) < 0)
            goto done;
        if (PK(mlu_ptw_param_end(&s->w, rg, &idx, &s->err)) < 0)
            goto done;
        rc = memo_record(s, t, idx);
        goto done;
    }
    if (strcmp(kind, "tensor") != 0) {
        PyErr_Format(PyExc_SystemError, "ptsave: bad tensor description kind %s", kind);
        goto done;
    }
    if ((f = desc_get(desc, "dtype")) == NULL || (dname = PyUnicode_AsUTF8(f)) == NULL)
        goto done;
    d.dt = mlu_torch_dtype_named(dname);
    if (d.dt < 0) {
        mlu_path_fail(PyExc_TypeError, "obj", at, "tensors of dtype torch.%s cannot be saved", dname);
        goto done;
    }
    Py_CLEAR(f);
    if ((f = desc_get(desc, "size")) == NULL || (d.size = int_array(f, &d.ndim)) == NULL)
        goto done;
    Py_CLEAR(f);
    if ((f = desc_get(desc, "stride")) == NULL || (d.stride = int_array(f, &n2)) == NULL)
        goto done;
    Py_CLEAR(f);
    if (n2 != d.ndim) {
        PyErr_SetString(PyExc_SystemError, "ptsave: size and stride differ in length");
        goto done;
    }
    if ((f = desc_get(desc, "storage_offset")) == NULL)
        goto done;
    d.offset = PyLong_AsLongLong(f);
    if (d.offset == -1 && PyErr_Occurred())
        goto done;
    Py_CLEAR(f);
    if ((f = desc_get(desc, "requires_grad")) == NULL || (d.requires_grad = PyObject_IsTrue(f)) < 0)
        goto done;
    Py_CLEAR(f);
    {
        unsigned long long nbytes;
        if ((f = desc_get(desc, "nbytes")) == NULL)
            goto done;
        nbytes = PyLong_AsUnsignedLongLong(f);
        if (nbytes == (unsigned long long)-1 && PyErr_Occurred())
            goto done;
        Py_CLEAR(f);
        if ((f = desc_get(desc, "storage_id")) == NULL || (f2 = desc_get(desc, "storage")) == NULL)
            goto done;
        d.storage = find_storage(s, s->tmap, f, f2, NULL, nbytes, 1, d.dt, at);
        if (d.storage < 0)
            goto done;
        Py_CLEAR(f);
        Py_CLEAR(f2);
    }
    if ((f = desc_get(desc, "metadata")) == NULL)
        goto done;
    if (f != Py_None) {
        d.metadata = f; /* borrowed from f, which lives until done */
        if (metadata_flags(f, &d.flags, at) < 0)
            goto done;
    }
    rc = emit_tensor(s, t, &d, at);
done:
    mlu_free(d.size);
    mlu_free(d.stride);
    Py_XDECREF(f);
    Py_XDECREF(f2);
    Py_XDECREF(kind_o);
    Py_XDECREF(desc);
    return rc;
}

/* The dtype index of a NumPy dtype, -1 when torch has no equivalent: by the
 * dtype table's numpy and ml_dtypes columns. */
static int numpy_dtype(PyArray_Descr *descr)
{
    size_t es = (size_t)PyDataType_ELSIZE(descr);
    const char *name = descr->typeobj->tp_name;
    int dt = -1;

    if (descr->type_num < NPY_USERDEF)
        dt = mlu_torch_dtype_of_numpy(descr->kind, es);
    else if (strncmp(name, "ml_dtypes.", 10) == 0) /* ml_dtypes' scalar types are named "ml_dtypes.<name>" */
        dt = mlu_torch_dtype_of_ml_dtypes(name + 10, es);
    return dt;
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
    es = mlu_torch_dtypes[d.dt].itemsize;
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
            d.storage = find_storage(s, s->nmap, ident, (PyObject *)root, base, nbytes, 0, d.dt, at);
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
    rc = emit_tensor(s, (PyObject *)a, &d, at);
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
        return PK(mlu_ptw_none(&s->w, &s->err));
    if (o == Py_True || o == Py_False)
        return PK(mlu_ptw_bool(&s->w, o == Py_True, &s->err));
    if (PyLong_CheckExact(o))
        return save_long(s, o, at);
    if (PyFloat_Check(o))
        return PK(mlu_ptw_float(&s->w, PyFloat_AS_DOUBLE(o), &s->err));
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

/* The MET_* bit of o, 0 when it is not a shared constant. */
static unsigned met_bit(PyObject *o)
{
    if (o == Py_None)
        return MET_NONE;
    if (o == Py_True)
        return MET_TRUE;
    if (o == Py_False)
        return MET_FALSE;
    if (Py_IS_TYPE(o, &PyTuple_Type) && PyTuple_GET_SIZE(o) == 0)
        return MET_EMPTY_TUPLE;
    return 0;
}

static int save_obj(saver *s, PyObject *o, const path_step *at)
{
    uint32_t idx;
    unsigned bit = met_bit(o);
    int rc = -1, r;

    /* The reader converts nothing deeper than MLU_PK_MAX_DEPTH, except what
     * it has converted already (memoized objects, shared constants), which it
     * takes from its memo: so the same rule here, in its words. */
    if (s->depth > MLU_PK_MAX_DEPTH && !(s->met & bit)) {
        r = bit != 0 ? 0 : memo_lookup(s, o, &idx);
        if (r < 0)
            goto done;
        if (r == 0) {
            PyErr_SetString(PyExc_ValueError, MLU_PK_DEPTH_RULE);
            goto done;
        }
    }
    if (Py_EnterRecursiveCall(" while saving a .pt file"))
        goto done;
    rc = save_obj_inner(s, o, at);
    Py_LeaveRecursiveCall();
    if (rc == 0)
        s->met |= bit;
done:
    return rc;
}

/* An item of a container: one level deeper than the container. */
static int save_child(saver *s, PyObject *o, const path_step *at)
{
    int rc;

    s->depth++;
    rc = save_obj(s, o, at);
    s->depth--;
    return rc;
}

/* ------------------------------------------------------------------ writing */

/* Writes the archive through sink.  storage_bytes(storage) -> (keepalive,
 * address, nbytes) gives a torch storage's CPU bytes (copied off a device);
 * the bytes go to the sink with the GIL released. */
static int write_zip(saver *s, const char *archive, mlu_zipw_sink sink, void *ctx, uint64_t limit,
                     PyObject *storage_bytes)
{
    PyObject *got = NULL;  /* owned: the current torch storage's (keepalive, address, nbytes) */
    PyObject *f = NULL;    /* owned: one field of got */
    Py_ssize_t i;
    mlu_status st;
    int rc = -1;

    Py_BEGIN_ALLOW_THREADS
    st = mlu_ptw_archive_begin(&s->w, archive, sink, ctx, limit, &s->err);
    Py_END_ALLOW_THREADS
    if (st != MLU_OK) {
        core_fail(s);
        goto done;
    }
    for (i = 0; i < s->nst; i++) {
        const void *data = s->w.st[i].data;
        uint64_t n = s->w.st[i].nbytes;

        if (s->st[i].is_torch) {
            unsigned long long addr, nb;
            got = PyObject_CallOneArg(storage_bytes, s->st[i].owner);
            if (got == NULL)
                goto done;
            /* _StorageBytes (owner, address, nbytes): got keeps owner alive */
            if ((f = desc_get(got, "address")) == NULL)
                goto done;
            addr = PyLong_AsUnsignedLongLong(f);
            Py_CLEAR(f);
            if (PyErr_Occurred() || (f = desc_get(got, "nbytes")) == NULL)
                goto done;
            nb = PyLong_AsUnsignedLongLong(f);
            Py_CLEAR(f);
            if (PyErr_Occurred())
                goto done;
            data = (const void *)(uintptr_t)addr;
            n = nb;
        }
        Py_BEGIN_ALLOW_THREADS
        st = mlu_ptw_archive_storage(&s->w, (size_t)i, data, n, &s->err);
        Py_END_ALLOW_THREADS
        Py_CLEAR(got);
        if (st != MLU_OK) {
            core_fail(s);
            goto done;
        }
    }
    Py_BEGIN_ALLOW_THREADS
    st = mlu_ptw_archive_finish(&s->w, &s->err);
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
    mlu_ptw_free(&s->w);
    Py_CLEAR(s->memo);
    Py_CLEAR(s->keep);
    Py_CLEAR(s->tmap);
    Py_CLEAR(s->nmap);
    Py_CLEAR(s->s_storage);
    Py_CLEAR(s->s_cpu);
    Py_CLEAR(s->odict_type);
}

static int saver_init(saver *s, mlu_state *mst, PyObject *tensor_type, PyObject *describe)
{
    PyObject *collections;

    memset(s, 0, sizeof(*s));
    s->mst = mst;
    mlu_error_clear(&s->err);
    if (mlu_ptw_init(&s->w, &s->err) != MLU_OK)
        return core_fail(s);
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
 * path: str, bytes or os.PathLike (the file, written atomically; fsynced when
 * durable; an OSError's file name is os.fspath(path)) or None (return the bytes). */
static PyObject *ptsave_write(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"obj", "path", "archive", "tensor_type", "describe", "storage_bytes",
                             "zip64_limit", "durable", NULL};
    PyObject *obj, *path, *tensor_type, *describe, *storage_bytes, *res = NULL;
    PyObject *fspath = NULL, *pathb = NULL; /* new refs: os.fspath(path), its bytes */
    PyObject *durable = Py_True; /* borrowed */
    const char *archive;
    unsigned long long limit = MLU_ZIP64_LIMIT;
    saver s;
    mlu_ptw_filesink fs;
    mlu_ptw_memsink mem = {NULL, 0, 0};
    PyObject *out = NULL;
    int have_file = 0;
    path_step root = {NULL, NULL, 0, 0};
    mlu_status st;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOsOOO|K$O!:_ptsave_write", kwlist, &obj, &path,
                                     &archive, &tensor_type, &describe, &storage_bytes, &limit,
                                     &PyBool_Type, &durable))
        return NULL;
    if (limit < 1) {
        PyErr_SetString(PyExc_ValueError, "zip64_limit must be positive");
        return NULL;
    }
    if (saver_init(&s, mlu_get_state(module), tensor_type, describe) < 0)
        goto done;
    if (path != Py_None) {
        fspath = PyOS_FSPath(path);
        if (fspath == NULL || !PyUnicode_FSConverter(fspath, &pathb))
            goto done;
    }
    if (save_obj(&s, obj, &root) < 0)
        goto error_core;
    if (mlu_ptw_pickle_end(&s.w, &s.err) != MLU_OK)
        goto error_core;
    if (pathb != NULL) {
        const char *p = PyBytes_AS_STRING(pathb);
        s.file = fspath;
        Py_BEGIN_ALLOW_THREADS
        st = mlu_afile_open(&fs.f, p, durable == Py_True ? MLU_AFILE_DURABLE : 0u, &s.err);
        Py_END_ALLOW_THREADS
        if (st != MLU_OK) {
            core_fail(&s);
            goto done;
        }
        have_file = 1;
    } else {
        size_t bound;
        if (mlu_ptw_archive_bound(&s.w, strlen(archive), &bound, &s.err) != MLU_OK)
            goto error_core;
        out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)bound);
        if (out == NULL)
            goto done;
        mem.p = PyBytes_AS_STRING(out);
        mem.cap = bound;
    }
    if (write_zip(&s, archive, have_file ? mlu_ptw_sink_file : mlu_ptw_sink_mem,
                  have_file ? (void *)&fs : (void *)&mem, limit, storage_bytes) < 0)
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
    Py_XDECREF(out);
    saver_free(&s);
    Py_XDECREF(pathb);
    Py_XDECREF(fspath);
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
