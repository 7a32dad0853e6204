/* pattern.c: the Python face of codebook interleaving patterns.
 *
 * PatternTable (a heap type) owns one core mlu_pattern; module functions
 * build it from provider arguments or from a Python layout, and gather
 * elements through its index tables (CPU buffers, or CUDA pointers). */
#include "npy.h"

#include "../core/alloc.h"
#include "../core/pattern.h"
#include "../cuda/mlu_cuda_pattern.h"

typedef struct {
    PyObject_HEAD
    mlu_pattern pat; /* owned */
} PatternTableObject;

#define TABLE_TYPE(st) ((PyTypeObject *)(st)->pattern_table_type)

static PyObject *raise_err(mlu_state *st, const mlu_error *err)
{
    return mlu_raise(st, err, MLU_DOMAIN_VALUE, NULL);
}

/* PatternError for a bad pattern (MLU_EINVAL or MLU_EFORMAT: errors.c's table). */
static PyObject *raise_pattern(mlu_state *st, const mlu_error *err)
{
    return mlu_raise(st, err, MLU_DOMAIN_PATTERN, NULL);
}

/* ------------------------------------------------------------------- type */

/* GC support: the only reference an instance holds is to its (heap) type. */
static int table_traverse(PyObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    return 0;
}

static void table_dealloc(PyObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);

    PyObject_GC_UnTrack(self);
    mlu_pattern_free(&((PatternTableObject *)self)->pat);
    tp->tp_free(self);
    Py_DECREF(tp);
}

/* New ref: an empty table of the module's type. */
static PatternTableObject *table_new(mlu_state *st, int64_t n_q, int64_t timesteps)
{
    PyTypeObject *tp = TABLE_TYPE(st);
    PatternTableObject *self = (PatternTableObject *)tp->tp_alloc(tp, 0);

    if (self != NULL)
        mlu_pattern_init(&self->pat, n_q, timesteps);
    return self;
}

#define TABLE_INT_GETTER(name, expr)                                        \
    static PyObject *table_get_##name(PyObject *self, void *closure)        \
    {                                                                       \
        const mlu_pattern *p = &((PatternTableObject *)self)->pat;          \
        (void)closure;                                                      \
        return PyLong_FromLongLong((long long)(expr));                      \
    }
TABLE_INT_GETTER(n_q, p->n_q)
TABLE_INT_GETTER(timesteps, p->timesteps)
TABLE_INT_GETTER(n_steps, p->n_steps)
TABLE_INT_GETTER(n_coords, p->n_coords)
TABLE_INT_GETTER(max_delay, p->max_delay)
TABLE_INT_GETTER(valid_steps, p->valid_steps)

static PyObject *table_get_starts_with_special(PyObject *self, void *closure)
{
    const mlu_pattern *p = &((PatternTableObject *)self)->pat;

    (void)closure;
    return PyBool_FromLong(p->n_steps > 0 && p->step_start[1] == p->step_start[0]);
}

/* New ref: coord_type((t, q)) built as a tuple subclass without calling
 * Python code. */
static PyObject *make_coord(PyTypeObject *coord_type, int64_t t, int64_t q)
{
    PyObject *pair = NULL, *args = NULL, *res = NULL;

    pair = Py_BuildValue("(LL)", (long long)t, (long long)q);
    if (pair == NULL)
        goto done;
    if (coord_type == &PyTuple_Type) {
        res = pair;
        pair = NULL;
        goto done;
    }
    args = PyTuple_Pack(1, pair);
    if (args == NULL)
        goto done;
    res = PyTuple_Type.tp_new(coord_type, args, NULL);
done:
    Py_XDECREF(pair);
    Py_XDECREF(args);
    return res;
}

/* layout(coord_type, start=0, stop=n_steps) -> list of lists of coord_type */
static PyObject *table_layout(PyObject *self, PyObject *args)
{
    const mlu_pattern *p = &((PatternTableObject *)self)->pat;
    PyObject *coord_type, *res = NULL, *step = NULL, *c;
    long long start = 0, stop = -1;
    int64_t s, i;

    if (!PyArg_ParseTuple(args, "O|LL:layout", &coord_type, &start, &stop))
        return NULL;
    if (!PyType_Check(coord_type) || !PyType_IsSubtype((PyTypeObject *)coord_type, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "coord_type must be a tuple subclass");
        return NULL;
    }
    if (stop < 0 || stop > p->n_steps)
        stop = p->n_steps;
    if (start < 0)
        start = 0;
    if (start > stop)
        start = stop;
    res = PyList_New((Py_ssize_t)(stop - start));
    if (res == NULL)
        return NULL;
    for (s = start; s < stop; s++) {
        int64_t lo = p->step_start[s], hi = p->step_start[s + 1];
        step = PyList_New((Py_ssize_t)(hi - lo));
        if (step == NULL)
            goto error;
        for (i = lo; i < hi; i++) {
            c = make_coord((PyTypeObject *)coord_type, p->t[i], p->q[i]);
            if (c == NULL)
                goto error;
            PyList_SET_ITEM(step, (Py_ssize_t)(i - lo), c); /* steals c */
        }
        PyList_SET_ITEM(res, (Py_ssize_t)(s - start), step); /* steals step */
        step = NULL;
    }
    return res;
error:
    Py_XDECREF(step);
    Py_DECREF(res);
    return NULL;
}

/* equals(other) -> bool */
static PyObject *table_equals(PyObject *self, PyObject *other)
{
    mlu_state *st = mlu_state_from_type(Py_TYPE(self));
    const mlu_pattern *a = &((PatternTableObject *)self)->pat, *b;
    int eq;

    if (st == NULL)
        return NULL;
    if (!PyObject_TypeCheck(other, TABLE_TYPE(st)))
        Py_RETURN_FALSE;
    b = &((PatternTableObject *)other)->pat;
    eq = a->n_q == b->n_q && a->timesteps == b->timesteps && a->n_steps == b->n_steps &&
         a->n_coords == b->n_coords &&
         memcmp(a->step_start, b->step_start, sizeof(int64_t) * (size_t)(a->n_steps + 1)) == 0 &&
         (a->n_coords == 0 ||
          (memcmp(a->t, b->t, sizeof(int32_t) * (size_t)a->n_coords) == 0 &&
           memcmp(a->q, b->q, sizeof(int32_t) * (size_t)a->n_coords) == 0));
    return PyBool_FromLong(eq);
}

/* find(t, q=-1) -> list of (step, t, q) */
static PyObject *table_find(PyObject *self, PyObject *args)
{
    const mlu_pattern *p = &((PatternTableObject *)self)->pat;
    long long t, q = -1;
    int64_t n, i, *steps = NULL, *coords = NULL;
    PyObject *res = NULL, *item;

    if (!PyArg_ParseTuple(args, "L|L:find", &t, &q))
        return NULL;
    /* two passes over an immutable pattern: no Python object touched */
    Py_BEGIN_ALLOW_THREADS
    n = mlu_pattern_find(p, t, q, NULL, NULL, 0);
    Py_END_ALLOW_THREADS
    steps = mlu_calloc((size_t)n + 1, sizeof(int64_t));
    coords = mlu_calloc((size_t)n + 1, sizeof(int64_t));
    if (steps == NULL || coords == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    mlu_pattern_find(p, t, q, steps, coords, n);
    Py_END_ALLOW_THREADS
    res = PyList_New((Py_ssize_t)n);
    if (res == NULL)
        goto done;
    for (i = 0; i < n; i++) {
        item = Py_BuildValue("(LLL)", (long long)steps[i], (long long)p->t[coords[i]],
                             (long long)p->q[coords[i]]);
        if (item == NULL) {
            Py_CLEAR(res);
            goto done;
        }
        PyList_SET_ITEM(res, (Py_ssize_t)i, item);
    }
done:
    mlu_free(steps);
    mlu_free(coords);
    return res;
}

/* New ref: a C-contiguous ndarray of runs [R, 2] for a flat index table. */
static PyObject *runs_array(const int64_t *idx, int64_t n, int64_t n_in)
{
    int64_t r = mlu_pattern_runs(idx, n, n_in, NULL, 0);
    npy_intp dims[2] = {(npy_intp)r, 2};
    PyObject *arr = PyArray_SimpleNew(2, dims, NPY_INT64);

    if (arr != NULL)
        mlu_pattern_runs(idx, n, n_in, (int64_t *)PyArray_DATA((PyArrayObject *)arr), r);
    return arr;
}

/* Shared tail of build/revert tables: (indexes, mask, runs). */
static PyObject *tables_result(mlu_state *st, PyObject *idx, PyObject *mask, mlu_status rc,
                               const mlu_error *err, int64_t n_in)
{
    PyObject *runs = NULL, *res = NULL;

    if (rc != MLU_OK) {
        raise_pattern(st, err);
        goto done;
    }
    runs = runs_array((const int64_t *)PyArray_DATA((PyArrayObject *)idx),
                      (int64_t)PyArray_SIZE((PyArrayObject *)idx), n_in);
    if (runs == NULL)
        goto done;
    res = PyTuple_Pack(3, idx, mask, runs);
done:
    Py_XDECREF(runs);
    return res;
}

/* build_indexes(T, K, valid) -> (indexes int64 [K, L], mask bool [K, L], runs) */
static PyObject *table_build_indexes(PyObject *self, PyObject *args)
{
    mlu_state *st = mlu_state_from_type(Py_TYPE(self));
    const mlu_pattern *p = &((PatternTableObject *)self)->pat;
    long long t_in, k;
    int valid;
    npy_intp dims[2];
    PyObject *idx = NULL, *mask = NULL, *res = NULL;
    mlu_error err;
    mlu_status rc;
    int64_t n_in;

    if (st == NULL || !PyArg_ParseTuple(args, "LLp:build_indexes", &t_in, &k, &valid))
        return NULL;
    mlu_error_clear(&err);
    if (k != p->n_q || t_in < 0 || t_in > p->timesteps) { /* the core's reason, before any shape is made */
        rc = mlu_pattern_build_indexes(p, t_in, k, valid, NULL, NULL, &err);
        return raise_pattern(st, &err);
    }
    dims[0] = (npy_intp)k;
    dims[1] = (npy_intp)mlu_pattern_ref_steps(p, valid);
    idx = PyArray_SimpleNew(2, dims, NPY_INT64);
    mask = PyArray_SimpleNew(2, dims, NPY_BOOL);
    if (idx == NULL || mask == NULL)
        goto done;
    Py_BEGIN_ALLOW_THREADS
    rc = mlu_pattern_build_indexes(p, t_in, k, valid, (int64_t *)PyArray_DATA((PyArrayObject *)idx),
                                   (uint8_t *)PyArray_DATA((PyArrayObject *)mask), &err);
    Py_END_ALLOW_THREADS
    n_in = (int64_t)(k * t_in);
    res = tables_result(st, idx, mask, rc, &err, n_in);
done:
    Py_XDECREF(idx);
    Py_XDECREF(mask);
    return res;
}

/* revert_indexes(S, K, valid, model_output) -> (indexes [K, T], mask [K, T], runs) */
static PyObject *table_revert_indexes(PyObject *self, PyObject *args)
{
    mlu_state *st = mlu_state_from_type(Py_TYPE(self));
    const mlu_pattern *p = &((PatternTableObject *)self)->pat;
    long long s_in, k;
    int valid, model_output;
    npy_intp dims[2];
    PyObject *idx = NULL, *mask = NULL, *res = NULL;
    mlu_error err;
    mlu_status rc;

    if (st == NULL ||
        !PyArg_ParseTuple(args, "LLpp:revert_indexes", &s_in, &k, &valid, &model_output))
        return NULL;
    mlu_error_clear(&err);
    if (k != p->n_q || s_in < 0 || s_in > mlu_pattern_ref_steps(p, valid) || p->timesteps < 0) {
        rc = mlu_pattern_revert_indexes(p, s_in, k, valid, model_output, NULL, NULL, &err);
        return raise_pattern(st, &err);
    }
    dims[0] = (npy_intp)k;
    dims[1] = (npy_intp)p->timesteps;
    idx = PyArray_SimpleNew(2, dims, NPY_INT64);
    mask = PyArray_SimpleNew(2, dims, NPY_BOOL);
    if (idx == NULL || mask == NULL)
        goto done;
    Py_BEGIN_ALLOW_THREADS
    rc = mlu_pattern_revert_indexes(p, s_in, k, valid, model_output,
                                    (int64_t *)PyArray_DATA((PyArrayObject *)idx),
                                    (uint8_t *)PyArray_DATA((PyArrayObject *)mask), &err);
    Py_END_ALLOW_THREADS
    res = tables_result(st, idx, mask, rc, &err, (int64_t)(k * s_in));
done:
    Py_XDECREF(idx);
    Py_XDECREF(mask);
    return res;
}

static PyGetSetDef table_getset[] = {
    {"n_q", table_get_n_q, NULL, "number of codebooks", NULL},
    {"timesteps", table_get_timesteps, NULL, "timesteps of the original sequence", NULL},
    {"n_steps", table_get_n_steps, NULL, "len(layout)", NULL},
    {"n_coords", table_get_n_coords, NULL, "coordinates over all steps", NULL},
    {"max_delay", table_get_max_delay, NULL, "the reference's max_delay", NULL},
    {"valid_steps", table_get_valid_steps, NULL, "len(valid_layout)", NULL},
    {"starts_with_special", table_get_starts_with_special, NULL, "layout[0] == []", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef table_methods[] = {
    {"layout", table_layout, METH_VARARGS,
     "layout(coord_type, start=0, stop=-1) -> list of lists of coord_type(t, q)."},
    {"equals", table_equals, METH_O, "equals(other) -> bool: same n_q, timesteps and layout."},
    {"find", table_find, METH_VARARGS, "find(t, q=-1) -> [(step, t, q)] in layout order."},
    {"build_indexes", table_build_indexes, METH_VARARGS,
     "build_indexes(T, K, valid) -> (indexes, mask, runs) of build_pattern_sequence."},
    {"revert_indexes", table_revert_indexes, METH_VARARGS,
     "revert_indexes(S, K, valid, model_output) -> (indexes, mask, runs) of the reverts."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot table_slots[] = {
    {Py_tp_dealloc, table_dealloc},
    {Py_tp_traverse, table_traverse},
    {Py_tp_getset, table_getset},
    {Py_tp_methods, table_methods},
    {Py_tp_doc, "The C tables of one codebook pattern (layout as compressed rows)."},
    {0, NULL},
};

static PyType_Spec table_spec = {
    .name = "mlutils._core.PatternTable",
    .basicsize = sizeof(PatternTableObject),
    .itemsize = 0,
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_DISALLOW_INSTANTIATION |
             Py_TPFLAGS_HAVE_GC,
    .slots = table_slots,
};

/* ----------------------------------------------------------- constructors */

/* A Python sequence of ints -> a new mlu_malloc'ed int64 array (*out, *n).
 * Returns 0 or -1 with an exception set. */
static int int_list(PyObject *obj, const char *what, int64_t **out, int64_t *n)
{
    PyObject *seq, *item;
    Py_ssize_t i, len;
    int64_t *arr;

    *out = NULL;
    *n = 0;
    seq = PySequence_Tuple(obj); /* new ref: a snapshot __index__ cannot mutate */
    if (seq == NULL) {
        if (PyErr_ExceptionMatches(PyExc_TypeError))
            PyErr_Format(PyExc_TypeError, "%s must be a sequence of ints", what);
        return -1;
    }
    len = PyTuple_GET_SIZE(seq);
    arr = mlu_calloc((size_t)len + 1, sizeof(int64_t));
    if (arr == NULL) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return -1;
    }
    for (i = 0; i < len; i++) {
        item = PyNumber_Index(PyTuple_GET_ITEM(seq, i)); /* new ref */
        if (item == NULL) {
            if (PyErr_ExceptionMatches(PyExc_TypeError))
                PyErr_Format(PyExc_TypeError, "%s[%zd] must be an int", what, i);
            goto error;
        }
        arr[i] = (int64_t)PyLong_AsLongLong(item);
        Py_DECREF(item);
        if (arr[i] == -1 && PyErr_Occurred()) {
            PyErr_Format(PyExc_OverflowError, "%s[%zd] does not fit in 64 bits", what, i);
            goto error;
        }
    }
    Py_DECREF(seq);
    *out = arr;
    *n = (int64_t)len;
    return 0;
error:
    Py_DECREF(seq);
    mlu_free(arr);
    return -1;
}

/* Finishes a constructor: table on success, PatternError otherwise. */
static PyObject *table_or_raise(mlu_state *st, PatternTableObject *tab, mlu_status rc,
                                const mlu_error *err)
{
    if (rc != MLU_OK) {
        Py_DECREF(tab);
        return raise_pattern(st, err);
    }
    return (PyObject *)tab;
}

/* The providers: pattern_check_<name>(n_q, lists...) validates the
 * arguments, pattern_<name>(n_q, ..., timesteps) builds the table.  Each
 * parses into provider_args by the shape of its kind (provider_parse), then
 * one function checks, builds and raises for all (provider_call). */
typedef enum provider {
    P_DELAYED,      /* (n_q, delays[, flatten_first, empty_initial, timesteps]) */
    P_UNROLLED,     /* (n_q, flattening, delays[, timesteps]) */
    P_COARSE_FIRST, /* (n_q, delays[, timesteps]) */
    P_MUSICLM,      /* (n_q, group_by, timesteps): nothing to check apart */
} provider;

/* A provider's arguments by name; the lists are owned (mlu_free). */
typedef struct provider_args {
    long long n_q, timesteps, flatten_first, empty_initial, group_by;
    int64_t *flattening, *delays;
    int64_t n_flat, n_delays;
} provider_args;

/* Parses args for provider p (with timesteps and the build options when
 * `build`): 0, or -1 with an exception set (lists made so far stay in a). */
static int provider_parse(provider p, int build, PyObject *args, provider_args *a)
{
    PyObject *flat = NULL, *delays = NULL; /* borrowed */
    int ok = 0;

    switch (p) {
    case P_DELAYED:
        ok = build ? PyArg_ParseTuple(args, "LOLLL:pattern_delayed", &a->n_q, &delays, &a->flatten_first,
                                      &a->empty_initial, &a->timesteps)
                   : PyArg_ParseTuple(args, "LO:pattern_check_delayed", &a->n_q, &delays);
        break;
    case P_UNROLLED:
        ok = build ? PyArg_ParseTuple(args, "LOOL:pattern_unrolled", &a->n_q, &flat, &delays, &a->timesteps)
                   : PyArg_ParseTuple(args, "LOO:pattern_check_unrolled", &a->n_q, &flat, &delays);
        break;
    case P_COARSE_FIRST:
        ok = build ? PyArg_ParseTuple(args, "LOL:pattern_coarse_first", &a->n_q, &delays, &a->timesteps)
                   : PyArg_ParseTuple(args, "LO:pattern_check_coarse_first", &a->n_q, &delays);
        break;
    case P_MUSICLM:
        ok = PyArg_ParseTuple(args, "LLL:pattern_musiclm", &a->n_q, &a->group_by, &a->timesteps);
        break;
    }
    if (!ok)
        return -1;
    if (flat != NULL && int_list(flat, "flattening", &a->flattening, &a->n_flat) < 0)
        return -1;
    if (delays != NULL && int_list(delays, "delays", &a->delays, &a->n_delays) < 0)
        return -1;
    return 0;
}

static mlu_status provider_check(provider p, const provider_args *a, mlu_error *err)
{
    switch (p) {
    case P_DELAYED:
        return mlu_pattern_check_delayed(a->n_q, a->delays, a->n_delays, err);
    case P_UNROLLED:
        return mlu_pattern_check_unrolled(a->n_q, a->flattening, a->n_flat, a->delays, a->n_delays, err);
    case P_COARSE_FIRST:
        return mlu_pattern_check_coarse_first(a->n_q, a->delays, a->n_delays, err);
    default:
        return MLU_OK;
    }
}

static mlu_status provider_build(provider p, mlu_pattern *pat, const provider_args *a, mlu_error *err)
{
    switch (p) {
    case P_DELAYED:
        return mlu_pattern_delayed(pat, a->delays, a->flatten_first, a->empty_initial, err);
    case P_UNROLLED:
        return mlu_pattern_unrolled(pat, a->flattening, a->delays, err);
    case P_COARSE_FIRST:
        return mlu_pattern_coarse_first(pat, a->delays, err);
    default:
        return mlu_pattern_musiclm(pat, a->group_by, err);
    }
}

/* New ref: None after a check (build 0), or the built PatternTable;
 * PatternError with the reason the core gives. */
static PyObject *provider_call(PyObject *m, PyObject *args, provider p, int build)
{
    mlu_state *st = mlu_get_state(m);
    provider_args a;
    PatternTableObject *tab;
    PyObject *res = NULL;
    mlu_error err;
    mlu_status rc;

    memset(&a, 0, sizeof(a));
    if (provider_parse(p, build, args, &a) < 0)
        goto done;
    mlu_error_clear(&err);
    if (provider_check(p, &a, &err) != MLU_OK) {
        raise_pattern(st, &err);
        goto done;
    }
    if (!build) {
        res = Py_NewRef(Py_None);
        goto done;
    }
    tab = table_new(st, a.n_q, a.timesteps);
    if (tab == NULL)
        goto done;
    Py_BEGIN_ALLOW_THREADS
    rc = provider_build(p, &tab->pat, &a, &err);
    Py_END_ALLOW_THREADS
    res = table_or_raise(st, tab, rc, &err);
done:
    mlu_free(a.flattening);
    mlu_free(a.delays);
    return res;
}

/* The module functions of each provider (a PyMethodDef cannot carry p). */
#define PROVIDER_FUNCTIONS(name, p)                                  \
    static PyObject *py_check_##name(PyObject *m, PyObject *args)    \
    {                                                                \
        return provider_call(m, args, p, 0);                         \
    }                                                                \
    static PyObject *py_##name(PyObject *m, PyObject *args)          \
    {                                                                \
        return provider_call(m, args, p, 1);                         \
    }
PROVIDER_FUNCTIONS(delayed, P_DELAYED)
PROVIDER_FUNCTIONS(unrolled, P_UNROLLED)
PROVIDER_FUNCTIONS(coarse_first, P_COARSE_FIRST)
#undef PROVIDER_FUNCTIONS

static PyObject *py_musiclm(PyObject *m, PyObject *args)
{
    return provider_call(m, args, P_MUSICLM, 1);
}

/* Reads one coordinate (a (t, q) pair: LayoutCoord or any 2-sequence).
 * Works on a tuple snapshot: an __index__ that mutates a list coordinate
 * cannot pull items from under us. */
static int read_coord(PyObject *c, Py_ssize_t s, long long *t, long long *q)
{
    PyObject *seq = PySequence_Tuple(c), *a, *b; /* new ref */
    int rc = -1;

    if (seq == NULL || PyTuple_GET_SIZE(seq) != 2) {
        /* an error of the coordinate's own code (its __iter__) goes through */
        if (seq == NULL && !PyErr_ExceptionMatches(PyExc_TypeError))
            goto done;
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "layout step %zd holds %R, not a (t, q) coordinate", s, c);
        goto done;
    }
    a = PyNumber_Index(PyTuple_GET_ITEM(seq, 0));
    if (a == NULL)
        goto bad;
    *t = PyLong_AsLongLong(a);
    Py_DECREF(a);
    if (*t == -1 && PyErr_Occurred())
        goto bad;
    b = PyNumber_Index(PyTuple_GET_ITEM(seq, 1));
    if (b == NULL)
        goto bad;
    *q = PyLong_AsLongLong(b);
    Py_DECREF(b);
    if (*q == -1 && PyErr_Occurred())
        goto bad;
    rc = 0;
    goto done;
bad:
    /* not an int, or too big: say where; anything else (raised by an
     * __index__) goes through as it is */
    if (PyErr_ExceptionMatches(PyExc_TypeError)) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "layout step %zd holds %R: t and q must be ints", s, c);
    } else if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
        PyErr_Clear();
        PyErr_Format(PyExc_OverflowError, "layout step %zd holds %R: t and q must fit in 64 bits", s, c);
    }
done:
    Py_XDECREF(seq);
    return rc;
}

/* pattern_from_layout(layout, n_q, timesteps) -> PatternTable */
static PyObject *py_from_layout(PyObject *m, PyObject *args)
{
    mlu_state *st = mlu_get_state(m);
    PyObject *layout, *seq = NULL, *step = NULL, *res = NULL;
    long long n_q, T, t, q;
    PatternTableObject *tab = NULL;
    Py_ssize_t s, i, n;
    mlu_error err;
    mlu_status rc = MLU_OK;

    if (!PyArg_ParseTuple(args, "OLL:pattern_from_layout", &layout, &n_q, &T))
        return NULL;
    mlu_error_clear(&err);
    /* Tuple snapshots (new refs) of the layout and of each step: the
     * coordinates' __index__ runs Python code that may mutate the lists. */
    seq = PySequence_Tuple(layout);
    if (seq == NULL) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_SetString(PyExc_TypeError, "the layout must be a list of lists of LayoutCoord");
        }
        return NULL;
    }
    tab = table_new(st, n_q, T);
    if (tab == NULL)
        goto done;
    n = PyTuple_GET_SIZE(seq);
    for (s = 0; s < n && rc == MLU_OK; s++) {
        step = PySequence_Tuple(PyTuple_GET_ITEM(seq, s));
        if (step == NULL) {
            if (PyErr_ExceptionMatches(PyExc_TypeError))
                PyErr_Format(PyExc_TypeError, "layout step %zd is not a list of coordinates", s);
            goto done;
        }
        rc = mlu_pattern_add_step(&tab->pat, &err);
        for (i = 0; rc == MLU_OK && i < PyTuple_GET_SIZE(step); i++) {
            if (read_coord(PyTuple_GET_ITEM(step, i), s, &t, &q) < 0)
                goto done;
            rc = mlu_pattern_add_coord(&tab->pat, t, q, &err);
        }
        Py_CLEAR(step);
    }
    if (rc == MLU_OK)
        rc = mlu_pattern_finish(&tab->pat, &err);
    res = table_or_raise(st, tab, rc, &err);
    tab = NULL;
done:
    Py_XDECREF(step);
    Py_XDECREF(tab);
    Py_DECREF(seq);
    return res;
}

/* ----------------------------------------------------------------- gather */

/* Checks that runs [R, 2] cover exactly n_out entries inside [0, n_in). */
static int check_runs(const int64_t *runs, int64_t n_runs, int64_t n_in, int64_t n_out)
{
    int64_t r, total = 0;

    for (r = 0; r < n_runs; r++) {
        int64_t start = runs[2 * r], len = runs[2 * r + 1];
        if (len <= 0 || len > n_out - total || start < -1 || (start >= 0 && (start > n_in || len > n_in - start))) {
            PyErr_Format(PyExc_ValueError, "pattern run %lld is out of range", (long long)r);
            return -1;
        }
        total += len;
    }
    if (total != n_out) {
        PyErr_Format(PyExc_ValueError, "pattern runs cover %lld entries, expected %lld",
                     (long long)total, (long long)n_out);
        return -1;
    }
    return 0;
}

/* 1 when a buffer's items are (or contain) Python object references. */
static int holds_objects(const Py_buffer *view)
{
    return view->format != NULL && strchr(view->format, 'O') != NULL;
}

/* pattern_gather(runs, src, outer, n_in, n_out, special, dst) -> None
 * src and dst are C-contiguous buffers; special is one element's bytes. */
static PyObject *py_gather(PyObject *m, PyObject *args)
{
    PyObject *runs_obj, *src_obj, *dst_obj, *res = NULL;
    PyArrayObject *runs = NULL;
    Py_buffer src = {0}, dst = {0}, special = {0};
    long long outer, n_in, n_out;
    int64_t n_runs, need_in, need_out;
    size_t es;

    (void)m;
    if (!PyArg_ParseTuple(args, "OOLLLy*O:pattern_gather", &runs_obj, &src_obj, &outer, &n_in,
                          &n_out, &special, &dst_obj))
        return NULL;
    es = (size_t)special.len;
    if (es < 1 || es > 16) {
        PyErr_SetString(PyExc_ValueError, "the special value must be 1 to 16 bytes");
        goto done;
    }
    if (outer < 0 || n_in < 0 || n_out < 0) {
        PyErr_SetString(PyExc_ValueError, "negative gather sizes");
        goto done;
    }
    runs = (PyArrayObject *)PyArray_FROMANY(runs_obj, NPY_INT64, 2, 2, NPY_ARRAY_IN_ARRAY);
    if (runs == NULL)
        goto done;
    if (PyArray_DIM(runs, 1) != 2) {
        PyErr_SetString(PyExc_ValueError, "runs must have shape [R, 2]");
        goto done;
    }
    n_runs = (int64_t)PyArray_DIM(runs, 0);
    if (check_runs((const int64_t *)PyArray_DATA(runs), n_runs, n_in, n_out) < 0)
        goto done;
    if (PyObject_GetBuffer(src_obj, &src, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        goto done;
    if (PyObject_GetBuffer(dst_obj, &dst, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE | PyBUF_FORMAT) < 0)
        goto done;
    if (holds_objects(&src) || holds_objects(&dst)) {
        /* copied bytes are not references: object pointers would crash */
        PyErr_SetString(PyExc_TypeError, "pattern_gather copies plain bytes, not Python objects");
        goto done;
    }
    if (mlu_mul_overflow_i64(outer, n_in, &need_in) || mlu_mul_overflow_i64(need_in, (int64_t)es, &need_in) ||
        mlu_mul_overflow_i64(outer, n_out, &need_out) ||
        mlu_mul_overflow_i64(need_out, (int64_t)es, &need_out)) {
        PyErr_SetString(PyExc_OverflowError, "gather size overflows");
        goto done;
    }
    if ((int64_t)src.len < need_in || (int64_t)dst.len < need_out) {
        PyErr_Format(PyExc_ValueError, "gather buffers too small (%zd < %lld or %zd < %lld bytes)",
                     src.len, (long long)need_in, dst.len, (long long)need_out);
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    mlu_pattern_gather(src.buf, outer, n_in, es, (const int64_t *)PyArray_DATA(runs), n_runs,
                       n_out, special.buf, dst.buf);
    Py_END_ALLOW_THREADS
    res = Py_NewRef(Py_None);
done:
    if (src.obj != NULL)
        PyBuffer_Release(&src);
    if (dst.obj != NULL)
        PyBuffer_Release(&dst);
    PyBuffer_Release(&special);
    Py_XDECREF(runs);
    return res;
}

/* cuda_pattern_gather(indexes_ptr, n_out, src_ptr, outer, n_in, special, dst_ptr, stream=0)
 * Device pointers from the caller (torch tensors it keeps alive). */
static PyObject *py_cuda_gather(PyObject *m, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"indexes", "n_out", "src", "outer", "n_in", "special", "dst",
                             "stream", NULL};
    unsigned long long idx = 0, src = 0, dst = 0, stream = 0;
    long long n_out, outer, n_in;
    Py_buffer special = {0};
    mlu_error err;
    mlu_status rc;
    PyObject *res = NULL;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "KLKLLy*K|K:cuda_pattern_gather", kwlist, &idx,
                                     &n_out, &src, &outer, &n_in, &special, &dst, &stream))
        return NULL;
    mlu_error_clear(&err);
    Py_BEGIN_ALLOW_THREADS
    rc = mlu_cuda_pattern_gather((const void *)(uintptr_t)src, outer, n_in,
                                 (const int64_t *)(uintptr_t)idx, n_out, (size_t)special.len,
                                 special.buf, (void *)(uintptr_t)dst,
                                 (void *)(uintptr_t)stream, &err);
    Py_END_ALLOW_THREADS
    if (rc != MLU_OK)
        raise_err(mlu_get_state(m), &err);
    else
        res = Py_NewRef(Py_None);
    PyBuffer_Release(&special);
    return res;
}

int mlu_pattern_module_init(PyObject *m)
{
    static PyMethodDef methods[] = {
        {"pattern_check_delayed", py_check_delayed, METH_VARARGS,
         "pattern_check_delayed(n_q, delays): PatternError unless valid."},
        {"pattern_check_unrolled", py_check_unrolled, METH_VARARGS,
         "pattern_check_unrolled(n_q, flattening, delays): PatternError unless valid."},
        {"pattern_check_coarse_first", py_check_coarse_first, METH_VARARGS,
         "pattern_check_coarse_first(n_q, delays): PatternError unless valid."},
        {"pattern_delayed", py_delayed, METH_VARARGS,
         "pattern_delayed(n_q, delays, flatten_first, empty_initial, timesteps) -> PatternTable."},
        {"pattern_unrolled", py_unrolled, METH_VARARGS,
         "pattern_unrolled(n_q, flattening, delays, timesteps) -> PatternTable."},
        {"pattern_coarse_first", py_coarse_first, METH_VARARGS,
         "pattern_coarse_first(n_q, delays, timesteps) -> PatternTable."},
        {"pattern_musiclm", py_musiclm, METH_VARARGS,
         "pattern_musiclm(n_q, group_by, timesteps) -> PatternTable."},
        {"pattern_from_layout", py_from_layout, METH_VARARGS,
         "pattern_from_layout(layout, n_q, timesteps) -> PatternTable."},
        {"pattern_gather", py_gather, METH_VARARGS,
         "pattern_gather(runs, src, outer, n_in, n_out, special, dst): dst[o, j] = src[o, idx[j]]."},
        {"cuda_pattern_gather", (PyCFunction)(void (*)(void))py_cuda_gather,
         METH_VARARGS | METH_KEYWORDS,
         "cuda_pattern_gather(indexes, n_out, src, outer, n_in, special, dst, stream=0): device gather."},
        {NULL, NULL, 0, NULL},
    };
    mlu_state *st = mlu_get_state(m);

    if (mlu_add_heap_type(m, &table_spec, &st->pattern_table_type) < 0)
        return -1;
    return PyModule_AddFunctions(m, methods);
}
