/* sampler.c: the Python face of the sampler core.
 *
 * _core.SamplerCursor is one rank's walk through the epochs of a sampler
 * (core/sampler.h): it is its own iterator, yields Python ints (or, with
 * batch offsets, lists of ints) from a small block computed in C, and hands
 * out numpy arrays through take().  _core.batch_pack is the greedy packing.
 * mlutils/sampler.py builds the public samplers on top of these. */
#include "npy.h"

#include <math.h>

#include "../core/alloc.h"
#include "../core/sampler.h"

#define CURSOR_BUF 512

typedef struct {
    PyObject_HEAD
    mlu_cursor c;
    int eager;              /* pool semantics: a new round starts right after the last draw */
    PyArrayObject *offsets; /* owned, or NULL: int64[count + 1] batch bounds (batch mode) */
    int64_t buf[CURSOR_BUF];
    uint64_t buf_k0;        /* buf holds the items of draws [buf_k0, buf_k0 + buf_len) */
    size_t buf_len;
} CursorObject;

static mlu_state *cursor_state(PyObject *self)
{
    return mlu_state_from_type(Py_TYPE(self));
}

/* Reads a non-negative int that fits in 64 bits; -1 with ValueError naming `what`. */
static int get_u64(PyObject *o, const char *what, uint64_t *out)
{
    unsigned long long v;

    if (!PyLong_Check(o) || PyBool_Check(o)) {
        PyErr_Format(PyExc_TypeError, "%s must be an int, not %.100s", what, Py_TYPE(o)->tp_name);
        return -1;
    }
    v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred() && PyErr_ExceptionMatches(PyExc_OverflowError)) {
        /* negative, or 2**64 and above */
        int ovf = 0;
        long long s;
        PyErr_Clear();
        s = PyLong_AsLongLongAndOverflow(o, &ovf);
        PyErr_Clear();
        if (ovf < 0 || (ovf == 0 && s < 0)) {
            PyErr_Format(PyExc_ValueError, "%s must be >= 0, got %R", what, o);
            return -1;
        }
        PyErr_Format(PyExc_ValueError, "%s does not fit in 64 bits: %R", what, o);
        return -1;
    }
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    *out = (uint64_t)v;
    return 0;
}

static int raise_core(PyObject *self, const mlu_error *err)
{
    mlu_state *st = cursor_state(self); /* borrowed; NULL with an exception set */

    if (st != NULL)
        mlu_raise(st, err, MLU_DOMAIN_VALUE, NULL);
    return -1;
}

/* Moves to the start of the next epoch (a new pool round). */
static int next_epoch(CursorObject *self)
{
    mlu_error err;

    mlu_error_clear(&err);
    if (self->c.epoch == UINT64_MAX) {
        PyErr_SetString(PyExc_OverflowError, "epoch counter overflow");
        return -1;
    }
    if (mlu_cursor_seek(&self->c, self->c.epoch + 1, 0, 0, &err) != MLU_OK)
        return raise_core((PyObject *)self, &err);
    self->buf_len = 0;
    return 0;
}

/* The item of draw k (k < count) through the block buffer. */
static int64_t cursor_item(CursorObject *self, uint64_t k)
{
    if (k < self->buf_k0 || k - self->buf_k0 >= self->buf_len) {
        uint64_t left = self->c.shard.count - k;
        size_t m = left < CURSOR_BUF ? (size_t)left : CURSOR_BUF;
        mlu_cursor_fill(&self->c, k, m, self->buf);
        self->buf_k0 = k;
        self->buf_len = m;
    }
    return self->buf[k - self->buf_k0];
}

/* New ref: list(range(offsets[b], offsets[b + 1])). */
static PyObject *batch_list(CursorObject *self, int64_t b)
{
    const int64_t *off = (const int64_t *)PyArray_DATA(self->offsets);
    int64_t lo = off[b], hi = off[b + 1], i;
    PyObject *list = PyList_New((Py_ssize_t)(hi - lo)), *v;

    if (list == NULL)
        return NULL;
    for (i = lo; i < hi; i++) {
        v = PyLong_FromLongLong(i);
        if (v == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)(i - lo), v); /* steals v */
    }
    return list;
}

/* New ref: the next draw, or NULL (no exception) when the epoch is done. */
static PyObject *cursor_next(PyObject *op)
{
    CursorObject *self = (CursorObject *)op;
    int64_t item;

    if (self->c.k >= self->c.shard.count) {
        /* an eager cursor only stands at the end of a segment after a seek
         * (an elastic resume that found the round done): start the next round */
        if (!self->eager || self->c.shard.n == 0)
            return NULL;
        if (next_epoch(self) < 0 || self->c.shard.count == 0)
            return NULL;
    }
    item = cursor_item(self, self->c.k);
    self->c.k++;
    if (self->eager && self->c.k == self->c.shard.count && next_epoch(self) < 0)
        return NULL;
    if (self->offsets != NULL)
        return batch_list(self, item);
    return PyLong_FromLongLong(item);
}

static PyObject *cursor_iter(PyObject *self)
{
    return Py_NewRef(self);
}

/* SamplerCursor(n, seed=0, stream=0, shuffle=False, drop_last=False,
 *               world_size=1, rank=0, eager=False, offsets=None) */
static PyObject *cursor_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"n", "seed", "stream", "shuffle", "drop_last", "world_size",
                             "rank", "eager", "offsets", NULL};
    PyObject *n_o, *seed_o = NULL, *stream_o = NULL, *world_o = NULL, *rank_o = NULL;
    PyObject *offsets_o = Py_None;
    uint64_t n, seed = 0, stream = 0, world = 1, rank = 0;
    int shuffle = 0, drop_last = 0, eager = 0;
    CursorObject *self = NULL;
    PyArrayObject *offsets = NULL;
    mlu_error err;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|OOppOOpO:SamplerCursor", kwlist, &n_o,
                                     &seed_o, &stream_o, &shuffle, &drop_last, &world_o,
                                     &rank_o, &eager, &offsets_o))
        return NULL;
    if (get_u64(n_o, "length", &n) < 0 ||
        (seed_o != NULL && get_u64(seed_o, "seed", &seed) < 0) ||
        (stream_o != NULL && get_u64(stream_o, "stream", &stream) < 0) ||
        (world_o != NULL && get_u64(world_o, "world_size", &world) < 0) ||
        (rank_o != NULL && get_u64(rank_o, "rank", &rank) < 0))
        return NULL;
    if (offsets_o != Py_None) {
        const int64_t *off;
        npy_intp i, len;
        /* A private, read-only copy: the caller's array (or the one
         * __reduce__ hands out) changing later must not bypass the checks. */
        offsets = (PyArrayObject *)PyArray_FROMANY(offsets_o, NPY_INT64, 1, 1,
                                                   NPY_ARRAY_IN_ARRAY | NPY_ARRAY_ENSURECOPY); /* new ref */
        if (offsets == NULL)
            return NULL;
        PyArray_CLEARFLAGS(offsets, NPY_ARRAY_WRITEABLE);
        len = PyArray_DIM(offsets, 0);
        off = (const int64_t *)PyArray_DATA(offsets);
        if ((uint64_t)len != n + 1 || off[0] != 0) {
            PyErr_SetString(PyExc_ValueError, "offsets must hold length + 1 bounds starting at 0");
            goto error;
        }
        for (i = 1; i < len; i++) {
            if (off[i] < off[i - 1]) {
                PyErr_SetString(PyExc_ValueError, "offsets must not decrease");
                goto error;
            }
        }
    }
    self = (CursorObject *)type->tp_alloc(type, 0); /* new ref */
    if (self == NULL)
        goto error;
    mlu_error_clear(&err);
    if (mlu_cursor_init(&self->c, n, seed, stream, shuffle, drop_last, world, rank, &err) != MLU_OK) {
        raise_core((PyObject *)self, &err);
        goto error;
    }
    self->eager = eager;
    self->offsets = offsets; /* steals */
    offsets = NULL;
    self->buf_len = 0;
    return (PyObject *)self;
error:
    Py_XDECREF(offsets);
    Py_XDECREF(self);
    return NULL;
}

static int cursor_traverse(PyObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(((CursorObject *)self)->offsets);
    return 0;
}

static int cursor_clear(PyObject *self)
{
    Py_CLEAR(((CursorObject *)self)->offsets);
    return 0;
}

static void cursor_dealloc(PyObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    cursor_clear(self);
    tp->tp_free(self);
    Py_DECREF(tp);
}

/* seek(epoch, base, index): moves to draw `index` of the segment that starts
 * after `base` global positions of epoch `epoch`. */
static PyObject *cursor_seek(PyObject *op, PyObject *args)
{
    CursorObject *self = (CursorObject *)op;
    PyObject *e_o, *b_o, *k_o;
    uint64_t e, b, k;
    mlu_error err;

    if (!PyArg_ParseTuple(args, "OOO:seek", &e_o, &b_o, &k_o))
        return NULL;
    if (get_u64(e_o, "epoch", &e) < 0 || get_u64(b_o, "base", &b) < 0 ||
        get_u64(k_o, "index", &k) < 0)
        return NULL;
    mlu_error_clear(&err);
    if (mlu_cursor_seek(&self->c, e, b, k, &err) != MLU_OK)
        return raise_core(op, &err), NULL;
    self->buf_len = 0;
    Py_RETURN_NONE;
}

/* Fills out[0, m) with the draws [k0, k0 + m) of `snap` without the GIL.
 * `snap` is a private copy of the cursor taken while the GIL was held, so
 * other threads moving the cursor meanwhile change nothing here. */
static void fill_unlocked(const mlu_cursor *snap, uint64_t k0, size_t m, int64_t *out)
{
    Py_BEGIN_ALLOW_THREADS
    mlu_cursor_fill(snap, k0, m, out);
    Py_END_ALLOW_THREADS
}

/* New ref: a fresh int64 array of m items of the draws of `snap` from k0. */
static PyArrayObject *fill_array(const mlu_cursor *snap, uint64_t k0, size_t m)
{
    npy_intp dims[1] = {(npy_intp)m};
    PyArrayObject *arr = (PyArrayObject *)PyArray_SimpleNew(1, dims, NPY_INT64);

    if (arr == NULL)
        return NULL;
    fill_unlocked(snap, k0, m, (int64_t *)PyArray_DATA(arr));
    return arr;
}

/* New ref: list of arrays, one per batch id in ids. */
static PyObject *batches_of(CursorObject *self, PyArrayObject *ids)
{
    const int64_t *off = (const int64_t *)PyArray_DATA(self->offsets);
    const int64_t *id = (const int64_t *)PyArray_DATA(ids);
    npy_intp i, j, n = PyArray_DIM(ids, 0);
    PyObject *list = PyList_New(n);

    if (list == NULL)
        return NULL;
    for (i = 0; i < n; i++) {
        npy_intp dims[1] = {(npy_intp)(off[id[i] + 1] - off[id[i]])};
        PyArrayObject *a = (PyArrayObject *)PyArray_SimpleNew(1, dims, NPY_INT64);
        int64_t *p;
        if (a == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        p = (int64_t *)PyArray_DATA(a);
        for (j = 0; j < dims[0]; j++)
            p[j] = off[id[i]] + j;
        PyList_SET_ITEM(list, i, (PyObject *)a); /* steals a */
    }
    return list;
}

/* New ref: the first m items of the fresh 1-d array arr (arr itself when it
 * has m items). */
static PyObject *first_items(PyArrayObject *arr, size_t m)
{
    if ((npy_intp)m == PyArray_DIM(arr, 0))
        return Py_NewRef((PyObject *)arr);
    return PySequence_GetSlice((PyObject *)arr, 0, (Py_ssize_t)m);
}

/* take(n) -> int64 array (list of arrays in batch mode): the next n draws,
 * fewer at the end of the epoch (an eager cursor crosses rounds instead).
 *
 * Threads: the GIL is released while the draws are computed, so every range
 * is reserved first (the cursor moved past it, a copy of the cursor kept)
 * with the GIL held and no Python code run in between; a thread entering
 * meanwhile reserves the draws after it. */
static PyObject *cursor_take(PyObject *op, PyObject *arg)
{
    CursorObject *self = (CursorObject *)op;
    PyArrayObject *arr = NULL;
    PyObject *res = NULL, *ids = NULL;
    uint64_t want, left, k0;
    size_t m, done = 0;
    npy_intp dims[1];
    mlu_cursor snap;

    if (get_u64(arg, "n", &want) < 0)
        return NULL;
    left = self->c.shard.count - self->c.k;
    if (!self->eager && want > left)
        want = left; /* the rest of the epoch */
    if (want > (uint64_t)NPY_MAX_INTP / 8) {
        PyErr_Format(PyExc_ValueError, "n is too large: %R", arg);
        return NULL;
    }
    dims[0] = (npy_intp)want;
    /* allocating can run Python code (a collection): other threads may draw
     * meanwhile, so the position is read only after it */
    arr = (PyArrayObject *)PyArray_SimpleNew(1, dims, NPY_INT64); /* new ref */
    if (arr == NULL)
        goto done;
    if (!self->eager) {
        left = self->c.shard.count - self->c.k;
        m = (size_t)(want < left ? want : left);
        snap = self->c;
        k0 = self->c.k;
        self->c.k += m; /* reserved */
        fill_unlocked(&snap, k0, m, (int64_t *)PyArray_DATA(arr));
        done = m;
    } else {
        while (done < (size_t)want) {
            if (self->c.k >= self->c.shard.count && self->c.shard.n > 0 && next_epoch(self) < 0)
                goto done;
            if (self->c.shard.count == 0) {
                PyErr_SetString(PyExc_ValueError,
                                "this rank's share of the pool is empty: nothing to draw");
                goto done;
            }
            left = self->c.shard.count - self->c.k;
            m = (size_t)((uint64_t)(want - done) < left ? (want - done) : left);
            snap = self->c;
            k0 = self->c.k;
            self->c.k += m; /* reserved */
            /* the last draw of a round refills the bag at once, as sample() does */
            if (self->c.k == self->c.shard.count && next_epoch(self) < 0)
                goto done;
            fill_unlocked(&snap, k0, m, (int64_t *)PyArray_DATA(arr) + done);
            done += m;
        }
    }
    ids = first_items(arr, done); /* new ref */
    if (ids == NULL)
        goto done;
    if (self->offsets != NULL)
        res = batches_of(self, (PyArrayObject *)ids);
    else
        res = Py_NewRef(ids);
done:
    Py_XDECREF(ids);
    Py_XDECREF(arr);
    return res;
}

/* restart() -> self: an exhausted cursor moves to the start of the next
 * epoch (what iter() on a sampler does); check and move are one step, so
 * threads calling it together start one epoch, not several. */
static PyObject *cursor_restart(PyObject *op, PyObject *unused)
{
    CursorObject *self = (CursorObject *)op;

    (void)unused;
    if (self->c.k >= self->c.shard.count && next_epoch(self) < 0)
        return NULL;
    return Py_NewRef(op);
}

/* set_epoch(e): moves to the start of epoch e unless the cursor is in it
 * already (a resumed epoch is not restarted), in one step. */
static PyObject *cursor_set_epoch(PyObject *op, PyObject *arg)
{
    CursorObject *self = (CursorObject *)op;
    uint64_t e;
    mlu_error err;

    if (get_u64(arg, "epoch", &e) < 0)
        return NULL;
    if (e != self->c.epoch) {
        mlu_error_clear(&err);
        if (mlu_cursor_seek(&self->c, e, 0, 0, &err) != MLU_OK)
            return raise_core(op, &err), NULL;
        self->buf_len = 0;
    }
    Py_RETURN_NONE;
}

/* What position() returns: fields by name (also a tuple).  The one
 * definition of this contract. */
enum { POS_SEED, POS_EPOCH, POS_BASE, POS_INDEX, POS_COUNT, POS_CONSUMED, POS_NFIELDS };
static PyStructSequence_Field position_fields[POS_NFIELDS + 1] = {
    [POS_SEED] = {"seed", "seed (mod 2**64)"},
    [POS_EPOCH] = {"epoch", "current epoch (pool round)"},
    [POS_BASE] = {"base", "global positions consumed before this segment"},
    [POS_INDEX] = {"index", "draws this rank made in the segment"},
    [POS_COUNT] = {"count", "draws this rank has in the segment"},
    [POS_CONSUMED] = {"consumed", "global positions consumed (capped at n)"},
    [POS_NFIELDS] = {NULL, NULL},
};
static PyStructSequence_Desc position_desc = {
    "mlutils._core.SamplerPosition",
    "A sampler cursor's position, read in one step: seed, epoch, base, index, count, consumed.",
    position_fields,
    POS_NFIELDS,
};

/* position() -> SamplerPosition, read in one step: a state saved while
 * other threads draw is a consistent one. */
static PyObject *cursor_position(PyObject *op, PyObject *unused)
{
    CursorObject *self = (CursorObject *)op;
    mlu_state *st = cursor_state(op); /* borrowed */
    uint64_t v[POS_NFIELDS];
    PyObject *res = NULL, *item;
    int i;

    (void)unused;
    if (st == NULL)
        return NULL;
    v[POS_SEED] = self->c.seed;
    v[POS_EPOCH] = self->c.epoch;
    v[POS_BASE] = self->c.shard.base;
    v[POS_INDEX] = self->c.k;
    v[POS_COUNT] = self->c.shard.count;
    v[POS_CONSUMED] = mlu_cursor_consumed(&self->c);
    res = PyStructSequence_New((PyTypeObject *)st->sampler_position_type);
    if (res == NULL)
        return NULL;
    for (i = 0; i < POS_NFIELDS; i++) {
        item = PyLong_FromUnsignedLongLong((unsigned long long)v[i]);
        if (item == NULL) {
            Py_CLEAR(res);
            break;
        }
        PyStructSequence_SET_ITEM(res, i, item); /* steals item */
    }
    return res;
}

/* next_in(epoch) -> the next draw while the cursor is still in `epoch` and
 * has draws left in it, else None: a pool round's iterator stops when the
 * round is used up, by whichever thread. */
static PyObject *cursor_next_in(PyObject *op, PyObject *arg)
{
    CursorObject *self = (CursorObject *)op;
    PyObject *res;
    uint64_t e;

    if (get_u64(arg, "epoch", &e) < 0)
        return NULL;
    if (e != self->c.epoch || self->c.k >= self->c.shard.count)
        Py_RETURN_NONE;
    res = cursor_next(op);
    if (res == NULL && !PyErr_Occurred())
        Py_RETURN_NONE;
    return res;
}

/* peek(k0, n) -> int64 array: the items of draws [k0, k0 + n) without moving. */
static PyObject *cursor_peek(PyObject *op, PyObject *args)
{
    CursorObject *self = (CursorObject *)op;
    PyObject *k_o, *n_o;
    uint64_t k0, n;
    mlu_cursor snap;

    if (!PyArg_ParseTuple(args, "OO:peek", &k_o, &n_o))
        return NULL;
    if (get_u64(k_o, "k0", &k0) < 0 || get_u64(n_o, "n", &n) < 0)
        return NULL;
    snap = self->c; /* the segment checked is the one filled, whatever other threads do */
    if (k0 > snap.shard.count || n > snap.shard.count - k0) {
        PyErr_SetString(PyExc_ValueError, "peek past the end of the epoch");
        return NULL;
    }
    return (PyObject *)fill_array(&snap, k0, (size_t)n);
}

/* The cursor's read-only attributes, one getter (the closure names the field). */
enum cursor_field {
    FIELD_N, FIELD_SEED, FIELD_STREAM, FIELD_EPOCH, FIELD_BASE, FIELD_INDEX, FIELD_COUNT,
    FIELD_WORLD_SIZE, FIELD_RANK, FIELD_CONSUMED, FIELD_DROP_LAST, FIELD_SHUFFLE
};

static PyObject *get_u64_field(PyObject *op, void *which)
{
    CursorObject *self = (CursorObject *)op;
    uint64_t v = 0;

    switch ((int)(intptr_t)which) {
    case FIELD_N: v = self->c.shard.n; break;
    case FIELD_SEED: v = self->c.seed; break;
    case FIELD_STREAM: v = self->c.stream; break;
    case FIELD_EPOCH: v = self->c.epoch; break;
    case FIELD_BASE: v = self->c.shard.base; break;
    case FIELD_INDEX: v = self->c.k; break;
    case FIELD_COUNT: v = self->c.shard.count; break;
    case FIELD_WORLD_SIZE: v = self->c.shard.world; break;
    case FIELD_RANK: v = self->c.shard.rank; break;
    case FIELD_CONSUMED: v = mlu_cursor_consumed(&self->c); break;
    case FIELD_DROP_LAST: v = (uint64_t)self->c.shard.drop_last; break;
    case FIELD_SHUFFLE: v = (uint64_t)self->c.shuffle; break;
    default: break;
    }
    return PyLong_FromUnsignedLongLong(v);
}

/* __reduce__ -> (type, constructor args, (epoch, base, index)): pickling and
 * copy.deepcopy keep the exact position. */
static PyObject *cursor_reduce(PyObject *op, PyObject *unused)
{
    CursorObject *self = (CursorObject *)op;
    (void)unused;
    return Py_BuildValue("(O(KKKiiKKiO)(KKK))", (PyObject *)Py_TYPE(op),
                         (unsigned long long)self->c.shard.n, (unsigned long long)self->c.seed,
                         (unsigned long long)self->c.stream, self->c.shuffle,
                         self->c.shard.drop_last, (unsigned long long)self->c.shard.world,
                         (unsigned long long)self->c.shard.rank, self->eager,
                         self->offsets != NULL ? (PyObject *)self->offsets : Py_None,
                         (unsigned long long)self->c.epoch, (unsigned long long)self->c.shard.base,
                         (unsigned long long)self->c.k);
}

static PyObject *cursor_setstate(PyObject *op, PyObject *state)
{
    if (!PyTuple_Check(state)) {
        PyErr_SetString(PyExc_TypeError, "SamplerCursor state must be a tuple (epoch, base, index)");
        return NULL;
    }
    return cursor_seek(op, state);
}

static PyGetSetDef cursor_getset[] = {
    {"n", get_u64_field, NULL, "length of the epoch's order", (void *)(intptr_t)FIELD_N},
    {"seed", get_u64_field, NULL, "seed (mod 2**64)", (void *)(intptr_t)FIELD_SEED},
    {"stream", get_u64_field, NULL, "stream id (kind of sampler)", (void *)(intptr_t)FIELD_STREAM},
    {"epoch", get_u64_field, NULL, "current epoch (pool round)", (void *)(intptr_t)FIELD_EPOCH},
    {"base", get_u64_field, NULL, "global positions consumed before this segment", (void *)(intptr_t)FIELD_BASE},
    {"index", get_u64_field, NULL, "draws this rank made in the segment", (void *)(intptr_t)FIELD_INDEX},
    {"count", get_u64_field, NULL, "draws this rank has in the segment", (void *)(intptr_t)FIELD_COUNT},
    {"world_size", get_u64_field, NULL, "ranks", (void *)(intptr_t)FIELD_WORLD_SIZE},
    {"rank", get_u64_field, NULL, "this rank", (void *)(intptr_t)FIELD_RANK},
    {"consumed", get_u64_field, NULL, "global positions consumed (capped at n)", (void *)(intptr_t)FIELD_CONSUMED},
    {"drop_last", get_u64_field, NULL, "1 when the uneven tail is dropped", (void *)(intptr_t)FIELD_DROP_LAST},
    {"shuffle", get_u64_field, NULL, "1 when the order is the keyed bijection", (void *)(intptr_t)FIELD_SHUFFLE},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef cursor_methods[] = {
    {"seek", cursor_seek, METH_VARARGS, "seek(epoch, base, index): move within the epochs."},
    {"take", cursor_take, METH_O, "take(n) -> int64 array: the next n draws."},
    {"restart", cursor_restart, METH_NOARGS,
     "restart() -> self: an exhausted cursor starts the next epoch (one step)."},
    {"set_epoch", cursor_set_epoch, METH_O,
     "set_epoch(e): move to the start of epoch e unless already in it (one step)."},
    {"position", cursor_position, METH_NOARGS,
     "position() -> (seed, epoch, base, index, count, consumed), read in one step."},
    {"next_in", cursor_next_in, METH_O,
     "next_in(epoch) -> the next draw while still in that epoch with draws left, else None."},
    {"peek", cursor_peek, METH_VARARGS, "peek(k0, n) -> int64 array: draws [k0, k0+n) without moving."},
    {"__reduce__", cursor_reduce, METH_NOARGS, "Pickle support (keeps the position)."},
    {"__setstate__", cursor_setstate, METH_O, "Pickle support: seek to (epoch, base, index)."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot cursor_slots[] = {
    {Py_tp_new, cursor_new},
    {Py_tp_dealloc, cursor_dealloc},
    {Py_tp_traverse, cursor_traverse},
    {Py_tp_clear, cursor_clear},
    {Py_tp_iter, cursor_iter},
    {Py_tp_iternext, cursor_next},
    {Py_tp_methods, cursor_methods},
    {Py_tp_getset, cursor_getset},
    {Py_tp_doc, "SamplerCursor(n, seed=0, stream=0, shuffle=False, drop_last=False, "
                "world_size=1, rank=0, eager=False, offsets=None): one rank's walk through "
                "a sampler's epochs; iterates ints (lists of ints with batch offsets)."},
    {0, NULL},
};

static PyType_Spec cursor_spec = {
    .name = "mlutils._core.SamplerCursor",
    .basicsize = sizeof(CursorObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = cursor_slots,
};

/* batch_pack(durations, max_duration, max_batch_size, use_max_size, drop_last)
 * -> int64 array of batch bounds (nbatches + 1 entries). */
static PyObject *py_batch_pack(PyObject *m, PyObject *args)
{
    PyObject *dur_o, *res = NULL;
    PyArrayObject *dur = NULL, *out = NULL;
    double max_duration;
    PyObject *max_batch_o;
    unsigned long long max_batch_size;
    int use_max_size, drop_last;
    int64_t *off = NULL;
    size_t nb = 0;
    mlu_error err;
    mlu_status st;
    npy_intp dims[1];

    if (!PyArg_ParseTuple(args, "OdO!pp:batch_pack", &dur_o, &max_duration, &PyLong_Type,
                          &max_batch_o, &use_max_size, &drop_last))
        return NULL;
    /* "K" would wrap a negative size to "no limit": refuse it instead */
    max_batch_size = PyLong_AsUnsignedLongLong(max_batch_o);
    if (max_batch_size == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return PyErr_Format(PyExc_ValueError, "max_batch_size must be in [0, 2**64), got %R",
                            max_batch_o);
    }
    /* a private copy: the packing runs without the GIL, and another thread
     * changing the caller's array meanwhile must not reach it */
    dur = (PyArrayObject *)PyArray_FROMANY(dur_o, NPY_FLOAT64, 1, 1,
                                           NPY_ARRAY_IN_ARRAY | NPY_ARRAY_ENSURECOPY); /* new ref */
    if (dur == NULL)
        goto done;
    mlu_error_clear(&err);
    Py_BEGIN_ALLOW_THREADS
    st = mlu_batch_pack((const double *)PyArray_DATA(dur), (size_t)PyArray_DIM(dur, 0),
                        max_duration, (uint64_t)max_batch_size, use_max_size, drop_last,
                        &off, &nb, &err);
    Py_END_ALLOW_THREADS
    if (st != MLU_OK) {
        mlu_raise(mlu_get_state(m), &err, MLU_DOMAIN_VALUE, NULL);
        goto done;
    }
    dims[0] = (npy_intp)nb + 1;
    out = (PyArrayObject *)PyArray_SimpleNew(1, dims, NPY_INT64); /* new ref */
    if (out == NULL)
        goto done;
    memcpy(PyArray_DATA(out), off, ((size_t)nb + 1) * sizeof(int64_t));
    res = (PyObject *)out;
    out = NULL;
done:
    mlu_free(off);
    Py_XDECREF(out);
    Py_XDECREF(dur);
    return res;
}

/* perm_apply(n, seed, stream, epoch, xs) -> int64 array: the bijection's
 * images of xs (each in [0, n)); for tests and tools. */
static PyObject *py_perm_apply(PyObject *m, PyObject *args)
{
    PyObject *n_o, *seed_o, *stream_o, *epoch_o, *xs_o;
    uint64_t n, seed, stream, epoch;
    PyArrayObject *xs = NULL;
    PyObject *res = NULL;
    mlu_perm p;
    npy_intp i, len;
    uint64_t *u;

    (void)m;
    if (!PyArg_ParseTuple(args, "OOOOO:perm_apply", &n_o, &seed_o, &stream_o, &epoch_o, &xs_o))
        return NULL;
    if (get_u64(n_o, "n", &n) < 0 || get_u64(seed_o, "seed", &seed) < 0 ||
        get_u64(stream_o, "stream", &stream) < 0 || get_u64(epoch_o, "epoch", &epoch) < 0)
        return NULL;
    xs = (PyArrayObject *)PyArray_FROMANY(xs_o, NPY_INT64, 1, 1,
                                          NPY_ARRAY_IN_ARRAY | NPY_ARRAY_ENSURECOPY); /* new ref */
    if (xs == NULL)
        return NULL;
    len = PyArray_DIM(xs, 0);
    u = (uint64_t *)PyArray_DATA(xs);
    for (i = 0; i < len; i++) {
        if (u[i] >= n) {
            PyErr_Format(PyExc_ValueError, "xs[%zd] is not in [0, n)", (Py_ssize_t)i);
            goto done;
        }
    }
    mlu_perm_init(&p, n, seed, stream, epoch);
    Py_BEGIN_ALLOW_THREADS
    mlu_perm_apply_many(&p, u, (size_t)len);
    Py_END_ALLOW_THREADS
    res = Py_NewRef((PyObject *)xs);
done:
    Py_DECREF(xs);
    return res;
}

int mlu_sampler_module_init(PyObject *m)
{
    static PyMethodDef methods[] = {
        {"batch_pack", py_batch_pack, METH_VARARGS,
         "batch_pack(durations, max_duration, max_batch_size, use_max_size, drop_last) "
         "-> int64 array of batch bounds."},
        {"perm_apply", py_perm_apply, METH_VARARGS,
         "perm_apply(n, seed, stream, epoch, xs) -> int64 array: the keyed bijection of [0, n)."},
        {NULL, NULL, 0, NULL},
    };
    mlu_state *st = mlu_get_state(m);

    if (PyModule_AddFunctions(m, methods) < 0 ||
        mlu_add_struct_type(m, &position_desc, &st->sampler_position_type) < 0)
        return -1;
    return mlu_add_heap_type(m, &cursor_spec, &st->sampler_cursor_type);
}
