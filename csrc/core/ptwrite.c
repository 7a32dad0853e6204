/* ptwrite.c: the .pt writer's format rules (see ptwrite.h). */
#define _GNU_SOURCE
#include "ptwrite.h"
#include "alloc.h"
#include "pickle_write.h"
#include "ptsave_id.h"
#include "ptview.h"
#include "zipfmt.h"

#include <fcntl.h>
#include <stdio.h>
#include <string.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define HOST_BYTEORDER "big"
#else
#define HOST_BYTEORDER "little"
#endif

/* ------------------------------------------------------------------ dtypes */

static int dtype_ok(int dtype)
{
    return dtype >= 0 && dtype < MLU_TORCH_N_DTYPES;
}

/* Globals the pickle can name; each is memoized once, as pickle does. */
enum {
    G_ODICT = 0,
    G_REBUILD_V2,
    G_REBUILD_V3,
    G_REBUILD_PARAM,
    G_UNTYPED,
    G_STORAGE0,                             /* + dtype index: torch.<X>Storage */
    G_DTYPE0 = G_STORAGE0 + MLU_TORCH_N_DTYPES, /* + dtype index: torch.<dtype> */
    G_COUNT = G_DTYPE0 + MLU_TORCH_N_DTYPES
};

typedef char globals_fit[G_COUNT == MLU_PTW_GLOBALS ? 1 : -1];

/* ------------------------------------------------------------------ pickle */

mlu_status mlu_ptw_init(mlu_ptw *w, mlu_error *err)
{
    int g;

    memset(w, 0, sizeof(*w));
    for (g = 0; g < G_COUNT; g++)
        w->gmemo[g] = -1;
    mlu_pkw_init(&w->pk);
    return mlu_pkw_proto(&w->pk, err);
}

void mlu_ptw_free(mlu_ptw *w)
{
    mlu_pkw_free(&w->pk);
    mlu_free(w->st);
    w->st = NULL;
    w->nst = w->cap = 0;
    if (w->zip_open)
        mlu_zipw_free(&w->zip);
    w->zip_open = 0;
}

static mlu_status put_global(mlu_ptw *w, int g, mlu_error *err)
{
    const char *module = "torch", *name;
    uint32_t idx = 0;
    mlu_status st;

    if (w->gmemo[g] >= 0)
        return mlu_pkw_get(&w->pk, (uint32_t)w->gmemo[g], err);
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
        name = g < G_DTYPE0 ? mlu_torch_dtypes[g - G_STORAGE0].storage_class : mlu_torch_dtypes[g - G_DTYPE0].name;
        break;
    }
    st = mlu_pkw_global(&w->pk, module, name, err);
    if (st == MLU_OK)
        st = mlu_pkw_put(&w->pk, &idx, err);
    if (st == MLU_OK)
        w->gmemo[g] = idx;
    return st;
}

mlu_status mlu_ptw_none(mlu_ptw *w, mlu_error *err)
{
    return mlu_pkw_op(&w->pk, MLU_PKOP_NONE, err);
}

mlu_status mlu_ptw_bool(mlu_ptw *w, int v, mlu_error *err)
{
    return mlu_pkw_bool(&w->pk, v, err);
}

mlu_status mlu_ptw_int(mlu_ptw *w, int64_t v, mlu_error *err)
{
    return mlu_pkw_int(&w->pk, v, err);
}

mlu_status mlu_ptw_long_bytes(mlu_ptw *w, const unsigned char *le, size_t n, mlu_error *err)
{
    return mlu_pkw_long_bytes(&w->pk, le, n, err);
}

mlu_status mlu_ptw_float(mlu_ptw *w, double v, mlu_error *err)
{
    return mlu_pkw_float(&w->pk, v, err);
}

mlu_status mlu_ptw_str(mlu_ptw *w, const char *s, size_t n, uint32_t *memo, mlu_error *err)
{
    mlu_status st = mlu_pkw_unicode(&w->pk, s, n, err);

    if (st == MLU_OK)
        st = mlu_pkw_put(&w->pk, memo, err);
    return st;
}

mlu_status mlu_ptw_get(mlu_ptw *w, uint32_t memo, mlu_error *err)
{
    return mlu_pkw_get(&w->pk, memo, err);
}

/* The container opcodes torch.save's pickler uses: how many items the batch
 * that starts at item i holds, and whether it is written as a lone item. */
static size_t batch_len(const mlu_ptw_seq *seq, size_t start)
{
    size_t left = seq->n - start;
    return left < MLU_PK_BATCH ? left : MLU_PK_BATCH;
}

static int batch_single(const mlu_ptw_seq *seq, size_t start)
{
    /* a real dict or list: only a container of one item (batch_*_exact);
     * an OrderedDict's items iterator: any batch of one (batch_dict) */
    return seq->kind == MLU_PTW_ODICT ? batch_len(seq, start) == 1 : seq->n == 1;
}

static mlu_status batch_close(mlu_ptw *w, const mlu_ptw_seq *seq, size_t start, mlu_error *err)
{
    int single = batch_single(seq, start);
    int op;

    if (seq->kind == MLU_PTW_LIST)
        op = single ? MLU_PKOP_APPEND : MLU_PKOP_APPENDS;
    else
        op = single ? MLU_PKOP_SETITEM : MLU_PKOP_SETITEMS;
    return mlu_pkw_op(&w->pk, op, err);
}

static void seq_start(mlu_ptw_seq *seq, int kind, size_t n)
{
    seq->kind = kind;
    seq->n = n;
    seq->i = 0;
}

/* OrderedDict() as OrderedDict.__reduce__ has it made: the global, () and
 * REDUCE, memoized (its index in *memo when memo is not NULL). */
static mlu_status new_odict(mlu_ptw *w, uint32_t *memo, mlu_error *err)
{
    mlu_status st = put_global(w, G_ODICT, err);

    if (st == MLU_OK)
        st = mlu_pkw_op(&w->pk, MLU_PKOP_EMPTY_TUPLE, err);
    if (st == MLU_OK)
        st = mlu_pkw_op(&w->pk, MLU_PKOP_REDUCE, err);
    if (st == MLU_OK)
        st = mlu_pkw_put(&w->pk, memo, err);
    return st;
}

/* An empty container (made by op, memoized) of `kind` whose n items follow. */
static mlu_status container_begin(mlu_ptw *w, mlu_ptw_seq *seq, int kind, int op, size_t n, uint32_t *memo,
                                  mlu_error *err)
{
    mlu_status st = mlu_pkw_op(&w->pk, op, err);

    seq_start(seq, kind, n);
    if (st == MLU_OK)
        st = mlu_pkw_put(&w->pk, memo, err);
    return st;
}

mlu_status mlu_ptw_dict_begin(mlu_ptw *w, mlu_ptw_seq *seq, size_t n, uint32_t *memo, mlu_error *err)
{
    return container_begin(w, seq, MLU_PTW_DICT, MLU_PKOP_EMPTY_DICT, n, memo, err);
}

mlu_status mlu_ptw_odict_begin(mlu_ptw *w, mlu_ptw_seq *seq, size_t n, uint32_t *memo, mlu_error *err)
{
    /* OrderedDict(), then its items, as OrderedDict.__reduce__ gives them */
    seq_start(seq, MLU_PTW_ODICT, n);
    return new_odict(w, memo, err);
}

mlu_status mlu_ptw_list_begin(mlu_ptw *w, mlu_ptw_seq *seq, size_t n, uint32_t *memo, mlu_error *err)
{
    return container_begin(w, seq, MLU_PTW_LIST, MLU_PKOP_EMPTY_LIST, n, memo, err);
}

mlu_status mlu_ptw_tuple_begin(mlu_ptw *w, mlu_ptw_seq *seq, size_t n, mlu_error *err)
{
    mlu_status st = MLU_OK;

    seq_start(seq, MLU_PTW_TUPLE, n);
    if (n > 3)
        st = mlu_pkw_op(&w->pk, MLU_PKOP_MARK, err);
    return st;
}

mlu_status mlu_ptw_item(mlu_ptw *w, mlu_ptw_seq *seq, mlu_error *err)
{
    mlu_status st = MLU_OK;

    if (seq->i >= seq->n)
        st = mlu_error_set(err, MLU_EINVAL, -1, "pt writer: more items than the %zu announced", seq->n);
    else if (seq->kind != MLU_PTW_TUPLE && seq->i % MLU_PK_BATCH == 0) {
        if (seq->i > 0)
            st = batch_close(w, seq, seq->i - MLU_PK_BATCH, err);
        if (st == MLU_OK && !batch_single(seq, seq->i))
            st = mlu_pkw_op(&w->pk, MLU_PKOP_MARK, err);
    }
    if (st == MLU_OK)
        seq->i++;
    return st;
}

mlu_status mlu_ptw_seq_end(mlu_ptw *w, mlu_ptw_seq *seq, uint32_t *memo, mlu_error *err)
{
    static const int small[4] = {MLU_PKOP_EMPTY_TUPLE, MLU_PKOP_TUPLE1, MLU_PKOP_TUPLE2, MLU_PKOP_TUPLE3};
    mlu_status st = MLU_OK;

    if (seq->i != seq->n)
        return mlu_error_set(err, MLU_EINVAL, -1, "pt writer: %zu items of the %zu announced", seq->i, seq->n);
    if (seq->kind == MLU_PTW_TUPLE) {
        st = mlu_pkw_op(&w->pk, seq->n > 3 ? MLU_PKOP_TUPLE : small[seq->n], err);
        if (seq->n == 0) {
            if (memo != NULL)
                *memo = MLU_PTW_NO_MEMO; /* pickle never memoizes the empty tuple */
        } else if (st == MLU_OK) {
            st = mlu_pkw_put(&w->pk, memo, err);
        }
    } else if (seq->n > 0) {
        st = batch_close(w, seq, (seq->n - 1) / MLU_PK_BATCH * MLU_PK_BATCH, err);
        /* a dict of an exact multiple of the batch size ends with an empty batch */
        if (st == MLU_OK && seq->kind == MLU_PTW_DICT && seq->n % MLU_PK_BATCH == 0) {
            st = mlu_pkw_op(&w->pk, MLU_PKOP_MARK, err);
            if (st == MLU_OK)
                st = mlu_pkw_op(&w->pk, MLU_PKOP_SETITEMS, err);
        }
    }
    return st;
}

mlu_status mlu_ptw_odict_state(mlu_ptw *w, mlu_error *err)
{
    return mlu_pkw_op(&w->pk, MLU_PKOP_BUILD, err);
}

/* ------------------------------------------------------------------ storages */

static int storage_dtype(int dtype)
{
    return mlu_torch_dtypes[dtype].storage_class != NULL ? dtype : MLU_TORCH_DTYPE_UINT8;
}

static mlu_status check_whole(int dtype, uint64_t nbytes, mlu_error *err)
{
    const mlu_torch_dtype *d = &mlu_torch_dtypes[dtype];

    if (d->storage_class != NULL && nbytes % (uint64_t)d->itemsize != 0)
        return mlu_error_set(err, MLU_EINVAL, -1, "storage of %llu bytes is not a whole number of %s elements",
                             (unsigned long long)nbytes, d->name);
    return MLU_OK;
}

mlu_status mlu_ptw_storage_add(mlu_ptw *w, int dtype, uint64_t nbytes, const void *data, size_t *index,
                               mlu_error *err)
{
    mlu_status st;

    if (!dtype_ok(dtype))
        return mlu_error_set(err, MLU_EINVAL, -1, "pt writer: dtype index %d out of range", dtype);
    st = check_whole(dtype, nbytes, err);
    if (st == MLU_OK && w->nst == w->cap)
        st = mlu_grow((void **)&w->st, &w->cap, w->nst + 1, sizeof(*w->st), SIZE_MAX, "pt writer storages", err);
    if (st == MLU_OK) {
        w->st[w->nst].nbytes = nbytes;
        w->st[w->nst].dtype = storage_dtype(dtype);
        w->st[w->nst].data = data;
        *index = w->nst++;
    }
    return st;
}

mlu_status mlu_ptw_storage_check(const mlu_ptw *w, size_t index, int dtype, uint64_t nbytes, mlu_error *err)
{
    mlu_status st;

    if (!dtype_ok(dtype) || index >= w->nst)
        return mlu_error_set(err, MLU_EINVAL, -1, "pt writer: no storage %zu or dtype %d", index, dtype);
    st = check_whole(dtype, nbytes, err);
    if (st == MLU_OK && w->st[index].dtype != storage_dtype(dtype))
        st = mlu_error_set(err, MLU_EINVAL, -1,
                           "cannot save tensors that view the same storage as different types (%s and %s)",
                           mlu_torch_dtypes[w->st[index].dtype].name, mlu_torch_dtypes[storage_dtype(dtype)].name);
    if (st == MLU_OK && w->st[index].nbytes != nbytes)
        st = mlu_error_set(err, MLU_EINVAL, -1, "a shared storage changed size while saving");
    return st;
}

/* ------------------------------------------------------------------ tensors */

/* A tuple of ints made up by the writer (size, stride): never shared. */
static mlu_status int_tuple(mlu_ptw *w, const int64_t *v, size_t n, mlu_error *err)
{
    mlu_ptw_seq seq;
    mlu_status st = mlu_ptw_tuple_begin(w, &seq, n, err);
    size_t i;

    for (i = 0; i < n && st == MLU_OK; i++) {
        st = mlu_ptw_item(w, &seq, err);
        if (st == MLU_OK)
            st = mlu_pkw_int(&w->pk, v[i], err);
    }
    if (st == MLU_OK)
        st = mlu_ptw_seq_end(w, &seq, NULL, err);
    return st;
}

/* A string of the persistent id, or its memo entry. */
static mlu_status pid_str(mlu_ptw *w, const char *s, uint32_t *memo, mlu_error *err)
{
    if (*memo != MLU_PTW_NO_MEMO)
        return mlu_pkw_get(&w->pk, *memo, err);
    return mlu_ptw_str(w, s, strlen(s), memo, err);
}

/* _rebuild_tensor_v2/v3(storage, offset, size, stride, requires_grad, hooks[, dtype][, metadata]) */
mlu_status mlu_ptw_tensor_begin(mlu_ptw *w, const mlu_ptw_tensor *t, uint32_t pid_memo[MLU_PTW_PID_COUNT],
                                mlu_error *err)
{
    const mlu_torch_dtype *d;
    const mlu_ptw_storage *s;
    mlu_pt_view view;
    uint64_t numel, end;
    char key[24];
    int v3;
    mlu_status st;

    if (!dtype_ok(t->dtype) || t->storage >= w->nst)
        return mlu_error_set(err, MLU_EINVAL, -1, "pt writer: no storage %zu or dtype %d", t->storage, t->dtype);
    d = &mlu_torch_dtypes[t->dtype];
    s = &w->st[t->storage];
    v3 = d->storage_class == NULL;
    snprintf(key, sizeof(key), "%zu", t->storage);
    /* nothing the reader would refuse (a storage cut after its view was made, 65 dimensions) */
    view.dtype = t->dtype;
    view.ndim = t->ndim;
    view.shape = t->shape;
    view.stride = t->stride;
    view.offset = t->offset;
    view.requires_grad = t->requires_grad;
    view.flags = t->flags;
    if ((st = mlu_pt_view_check(&view, key, strlen(key), s->nbytes, &end, err)) != MLU_OK)
        return st;
    /* the pid's numel: bytes for UntypedStorage, elements for the legacy classes */
    numel = v3 ? s->nbytes : s->nbytes / (uint64_t)d->itemsize;
    if (numel > (uint64_t)INT64_MAX)
        return mlu_error_set(err, MLU_EOVERFLOW, -1, "storage of %llu bytes is too large",
                             (unsigned long long)s->nbytes);
    st = put_global(w, v3 ? G_REBUILD_V3 : G_REBUILD_V2, err);
    if (st == MLU_OK)
        st = mlu_pkw_op(&w->pk, MLU_PKOP_MARK, err);
    /* persistent id ('storage', class, key, 'cpu', numel) */
    if (st == MLU_OK)
        st = mlu_pkw_op(&w->pk, MLU_PKOP_MARK, err);
    if (st == MLU_OK)
        st = pid_str(w, "storage", &pid_memo[MLU_PTW_PID_STORAGE], err);
    if (st == MLU_OK)
        st = put_global(w, v3 ? G_UNTYPED : G_STORAGE0 + t->dtype, err);
    if (st == MLU_OK)
        st = pid_str(w, key, &pid_memo[MLU_PTW_PID_KEY], err);
    if (st == MLU_OK)
        st = pid_str(w, "cpu", &pid_memo[MLU_PTW_PID_CPU], err);
    if (st == MLU_OK)
        st = mlu_pkw_int(&w->pk, (int64_t)numel, err);
    if (st == MLU_OK)
        st = mlu_pkw_op(&w->pk, MLU_PKOP_TUPLE, err);
    if (st == MLU_OK)
        st = mlu_pkw_put(&w->pk, NULL, err);
    if (st == MLU_OK)
        st = mlu_pkw_op(&w->pk, MLU_PKOP_BINPERSID, err);
    if (st == MLU_OK)
        st = mlu_pkw_int(&w->pk, t->offset, err);
    if (st == MLU_OK)
        st = int_tuple(w, t->shape, t->ndim, err);
    if (st == MLU_OK)
        st = int_tuple(w, t->stride, t->ndim, err);
    if (st == MLU_OK)
        st = mlu_pkw_bool(&w->pk, t->requires_grad, err);
    /* backward hooks: OrderedDict() */
    if (st == MLU_OK)
        st = new_odict(w, NULL, err);
    if (st == MLU_OK && v3)
        st = put_global(w, G_DTYPE0 + t->dtype, err);
    return st;
}

/* Closes a call: the argument tuple (tuple_op), memoized, REDUCE, and the
 * result memoized (its index in *memo when memo is not NULL). */
static mlu_status close_call(mlu_ptw *w, int tuple_op, uint32_t *memo, mlu_error *err)
{
    mlu_status st = mlu_pkw_op(&w->pk, tuple_op, err);

    if (st == MLU_OK)
        st = mlu_pkw_put(&w->pk, NULL, err);
    if (st == MLU_OK)
        st = mlu_pkw_op(&w->pk, MLU_PKOP_REDUCE, err);
    if (st == MLU_OK)
        st = mlu_pkw_put(&w->pk, memo, err);
    return st;
}

mlu_status mlu_ptw_tensor_end(mlu_ptw *w, uint32_t *memo, mlu_error *err)
{
    return close_call(w, MLU_PKOP_TUPLE, memo, err);
}

mlu_status mlu_ptw_param_begin(mlu_ptw *w, mlu_error *err)
{
    return put_global(w, G_REBUILD_PARAM, err);
}

/* _rebuild_parameter(data, requires_grad, OrderedDict()) */
mlu_status mlu_ptw_param_end(mlu_ptw *w, int requires_grad, uint32_t *memo, mlu_error *err)
{
    mlu_status st = mlu_pkw_bool(&w->pk, requires_grad, err);

    if (st == MLU_OK)
        st = new_odict(w, NULL, err); /* backward hooks */
    if (st == MLU_OK)
        st = close_call(w, MLU_PKOP_TUPLE3, memo, err);
    return st;
}

mlu_status mlu_ptw_pickle_end(mlu_ptw *w, mlu_error *err)
{
    mlu_status st;

    if (w->pickled)
        return mlu_error_set(err, MLU_EINVAL, -1, "pt writer: the pickle was already ended");
    st = mlu_pkw_op(&w->pk, MLU_PKOP_STOP, err);
    if (st == MLU_OK)
        w->pickled = 1;
    return st;
}

const char *mlu_ptw_pickle(const mlu_ptw *w, size_t *len)
{
    *len = w->pk.buf.len;
    return w->pk.buf.data;
}

/* ------------------------------------------------------------------ archive */

/* Records the archive holds besides the storages. */
#define FIXED_RECORDS 6
/* The longest record name besides the prefix ("data/" + 20 digits fit). */
#define NAME_MAX_LEN 32

mlu_status mlu_ptw_archive_bound(const mlu_ptw *w, size_t archive_len, size_t *out, mlu_error *err)
{
    /* per record: local header + name + zip64 extra + FB field and padding
     * + descriptor + central header + name + zip64 extra */
    size_t name = 0, per = 0, total = 0, add = 0, i;
    int bad = mlu_add_overflow_size(archive_len, 1 + NAME_MAX_LEN, &name);

    bad |= mlu_mul_overflow_size(name, 2, &per);
    bad |= mlu_add_overflow_size(per,
                                 MLU_ZIP_LFH_SIZE + 28 + MLU_ZIP_EXTRA_HEAD + 255 + MLU_ZIP_DD64_SIZE
                                     + MLU_ZIP_CDH_SIZE + 28,
                                 &per);
    /* end records (98 bytes) and FIXED_RECORDS records, a little to spare */
    bad |= mlu_mul_overflow_size(per, FIXED_RECORDS, &total);
    bad |= mlu_add_overflow_size(total, MLU_ZIP_EOCD64_SIZE + MLU_ZIP_LOC64_SIZE + MLU_ZIP_EOCD_SIZE + 16, &total);
    bad |= mlu_add_overflow_size(total, w->pk.buf.len, &total);
    for (i = 0; i < w->nst && !bad; i++) {
        bad |= w->st[i].nbytes > (uint64_t)SIZE_MAX;
        bad |= mlu_add_overflow_size((size_t)w->st[i].nbytes, per, &add);
        bad |= mlu_add_overflow_size(total, add, &total);
    }
    if (bad || total > (size_t)PTRDIFF_MAX)
        return mlu_error_set(err, MLU_EOVERFLOW, -1, "the archive is too large to build in memory");
    *out = total;
    return MLU_OK;
}

mlu_status mlu_ptw_archive_begin(mlu_ptw *w, const char *archive, mlu_zipw_sink sink, void *ctx,
                                 uint64_t zip64_limit, mlu_error *err)
{
    static const char order[] = HOST_BYTEORDER;
    mlu_status st;

    if (!w->pickled || w->zip_open)
        return mlu_error_set(err, MLU_EINVAL, -1, "pt writer: archive begun %s",
                             w->zip_open ? "twice" : "before the pickle ended");
    if (zip64_limit < 1)
        return mlu_error_set(err, MLU_EINVAL, -1, "zip64_limit must be positive");
    st = mlu_zipw_init(&w->zip, archive, sink, ctx, err);
    w->zip_open = 1; /* mlu_zipw_free is safe after a failed init */
    w->zip.zip64_limit = zip64_limit;
    w->next_storage = 0;
    if (st == MLU_OK)
        st = mlu_zipw_record(&w->zip, "data.pkl", w->pk.buf.data, w->pk.buf.len, err);
    if (st == MLU_OK)
        st = mlu_zipw_record(&w->zip, ".format_version", "1", 1, err);
    if (st == MLU_OK)
        st = mlu_zipw_record(&w->zip, ".storage_alignment", "64", 2, err);
    if (st == MLU_OK)
        st = mlu_zipw_record(&w->zip, "byteorder", order, sizeof(order) - 1, err);
    return st;
}

mlu_status mlu_ptw_archive_storage(mlu_ptw *w, size_t index, const void *data, uint64_t nbytes,
                                   mlu_error *err)
{
    char name[32];
    mlu_status st;

    if (!w->zip_open || index != w->next_storage || index >= w->nst)
        return mlu_error_set(err, MLU_EINVAL, -1, "pt writer: storage %zu written out of order", index);
    if (nbytes != w->st[index].nbytes)
        return mlu_error_set(err, MLU_EINVAL, -1, "storage %zu changed size while saving (%llu bytes, then %llu)",
                             index, (unsigned long long)w->st[index].nbytes, (unsigned long long)nbytes);
    if (nbytes > (uint64_t)SIZE_MAX)
        return mlu_error_set(err, MLU_EOVERFLOW, -1, "storage %zu of %llu bytes does not fit in memory", index,
                             (unsigned long long)nbytes);
    /* keys are the storages' numbers, in the order they were first met */
    snprintf(name, sizeof(name), "data/%zu", index);
    st = mlu_zipw_begin(&w->zip, name, nbytes, err);
    if (st == MLU_OK && nbytes > 0)
        st = mlu_zipw_payload(&w->zip, data, (size_t)nbytes, err);
    if (st == MLU_OK)
        st = mlu_zipw_end(&w->zip, err);
    if (st == MLU_OK)
        w->next_storage++;
    return st;
}

/* The `.data/serialization_id` record torch.save ends with. */
static mlu_status add_serialization_id(mlu_zipw *zw, mlu_error *err)
{
    size_t n = zw->count ? zw->count : 1, i;
    const char **names = mlu_calloc(n, sizeof(char *));
    uint32_t *crcs = mlu_calloc(n, sizeof(uint32_t));
    uint64_t *sizes = mlu_calloc(n, sizeof(uint64_t));
    char id[41];
    mlu_status st;

    if (names == NULL || crcs == NULL || sizes == NULL) {
        st = mlu_error_set(err, MLU_ENOMEM, -1, "out of memory");
        goto done;
    }
    for (i = 0; i < zw->count; i++) {
        names[i] = zw->entries[i].name + zw->prefix_len;
        crcs[i] = zw->entries[i].crc;
        sizes[i] = zw->entries[i].size;
    }
    {
        mlu_error local;
        mlu_error_clear(&local);
        st = mlu_pt_serialization_id(names, crcs, sizes, zw->count, id, &local);
        if (st == MLU_ENOTSUP) {
            /* optional for readers: left out past what the id computation covers */
            st = MLU_OK;
            goto done;
        }
        if (st != MLU_OK) {
            if (err != NULL && err->code == MLU_OK)
                *err = local;
            goto done;
        }
    }
    st = mlu_zipw_record(zw, ".data/serialization_id", id, 40, err);
done:
    mlu_free(names);
    mlu_free(crcs);
    mlu_free(sizes);
    return st;
}

mlu_status mlu_ptw_archive_finish(mlu_ptw *w, mlu_error *err)
{
    mlu_status st;

    if (!w->zip_open || w->next_storage != w->nst)
        return mlu_error_set(err, MLU_EINVAL, -1, "pt writer: archive finished after %zu of %zu storages",
                             w->next_storage, w->nst);
    st = mlu_zipw_record(&w->zip, "version", "3\n", 2, err);
    if (st == MLU_OK)
        st = add_serialization_id(&w->zip, err);
    if (st == MLU_OK)
        st = mlu_zipw_finish(&w->zip, err);
    return st;
}

mlu_status mlu_ptw_archive_write(mlu_ptw *w, const char *archive, mlu_zipw_sink sink, void *ctx,
                                 uint64_t zip64_limit, mlu_ptw_fetch fetch, void *fetch_ctx, mlu_error *err)
{
    mlu_status st = mlu_ptw_archive_begin(w, archive, sink, ctx, zip64_limit, err);
    size_t i;

    for (i = 0; i < w->nst && st == MLU_OK; i++) {
        const void *data = w->st[i].data;
        if (data == NULL && fetch != NULL)
            st = fetch(fetch_ctx, i, w->st[i].nbytes, &data, err);
        if (st == MLU_OK && data == NULL && w->st[i].nbytes > 0)
            st = mlu_error_set(err, MLU_EINVAL, -1, "pt writer: storage %zu has no bytes", i);
        if (st == MLU_OK)
            st = mlu_ptw_archive_storage(w, i, data, w->st[i].nbytes, err);
    }
    if (st == MLU_OK)
        st = mlu_ptw_archive_finish(w, err);
    return st;
}

/* ------------------------------------------------------------------ sinks */

mlu_status mlu_ptw_sink_file(void *ctx, const void *p, size_t n, mlu_error *err)
{
    mlu_ptw_filesink *fs = ctx;

    return mlu_afile_write(&fs->f, p, n, err); /* paces durable writeback itself */
}

mlu_status mlu_ptw_sink_mem(void *ctx, const void *p, size_t n, mlu_error *err)
{
    mlu_ptw_memsink *b = ctx;

    if (n > b->cap - b->len)
        return mlu_error_set(err, MLU_EOVERFLOW, -1, "archive outgrew its computed size");
    memcpy(b->p + b->len, p, n);
    b->len += n;
    return MLU_OK;
}
