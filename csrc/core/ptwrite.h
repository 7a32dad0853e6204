/* ptwrite.h: the .pt (torch.save zip) writer: every rule of the format.
 *
 * The caller walks its own values and hands the writer plain descriptors:
 * containers, strings, numbers, tensors and storages.  The writer picks the
 * pickle opcodes torch.save's pickler picks (batches of SETITEMS/APPENDS,
 * memo puts, the _rebuild_tensor_v2/v3 call with its persistent id
 * ('storage', storage class, key, 'cpu', numel), the dtype table), then lays
 * out the archive (data.pkl, .format_version, .storage_alignment, byteorder,
 * data/<key>..., version, .data/serialization_id) through a zip sink.  So the
 * bytes match torch.save's for the same object and archive name.
 *
 * Memo: Python's pickler memoizes by object identity, which only the caller
 * knows.  Every call that memoizes hands back the memo index it used; the
 * caller remembers it for its object and writes a repeat with mlu_ptw_get.
 *
 *   mlu_ptw w;
 *   mlu_ptw_init(&w, &err);                       PROTO 2
 *   mlu_ptw_dict_begin(&w, &seq, 2, &memo);        {   (EMPTY_DICT, PUT)
 *     mlu_ptw_item(&w, &seq, &err);                    before each key/value pair
 *     mlu_ptw_str(&w, "w", 1, &memo, &err); ...        the key, then the value
 *   mlu_ptw_seq_end(&w, &seq, &err);               }
 *   mlu_ptw_pickle_end(&w, &err);                  STOP
 *   mlu_ptw_archive_begin(&w, "model", sink, ctx, MLU_ZIP64_LIMIT, &err);
 *   mlu_ptw_archive_storage(&w, i, data, nbytes, &err);   for i = 0, 1, ...
 *   mlu_ptw_archive_finish(&w, &err);
 *   mlu_ptw_free(&w);
 * (mlu_ptw_archive_write does the last three in one call.)
 *
 * A failed call leaves the writer unusable except for mlu_ptw_free. */
#ifndef MLU_PTWRITE_H
#define MLU_PTWRITE_H

#include "../mlu.h"
#include "pickle_write.h"
#include "torch_dtypes.h"
#include "zipwrite.h"
#include "atomicfile.h"

/* ------------------------------------------------------------------ writer */

#define MLU_PTW_NO_MEMO UINT32_MAX
/* The globals the pickle names: 5 fixed ones + a storage class and a dtype per dtype. */
#define MLU_PTW_GLOBALS (5 + 2 * MLU_TORCH_N_DTYPES)

/* The strings of a persistent id that the caller may have memoized already. */
enum { MLU_PTW_PID_STORAGE = 0, MLU_PTW_PID_KEY, MLU_PTW_PID_CPU, MLU_PTW_PID_COUNT };

typedef struct mlu_ptw_storage {
    uint64_t nbytes;
    int dtype;            /* dtype the storage is typed as (uint8 for untyped ones, as torch) */
    const void *data;     /* borrowed, or NULL: the bytes come with mlu_ptw_archive_storage */
} mlu_ptw_storage;

typedef struct mlu_ptw {
    mlu_pkw pk;                /* owned: data.pkl so far */
    int64_t gmemo[MLU_PTW_GLOBALS]; /* memo index of each global, -1 before its first use */
    mlu_ptw_storage *st;       /* owned */
    size_t nst, cap;
    int pickled;               /* STOP written */
    mlu_zipw zip;              /* the archive, between archive_begin and free */
    int zip_open;
    size_t next_storage;       /* the next storage record to write */
} mlu_ptw;

typedef enum mlu_ptw_seq_kind {
    MLU_PTW_DICT = 0,   /* a dict: a lone item uses SETITEM, else MARK..SETITEMS per 1000
                           (and an empty batch after an exact multiple of 1000) */
    MLU_PTW_ODICT,      /* OrderedDict(): a lone item in any batch uses SETITEM */
    MLU_PTW_LIST,       /* a lone item uses APPEND, else MARK..APPENDS per 1000 */
    MLU_PTW_TUPLE       /* (MARK when over 3) items, TUPLE/TUPLE1..3, PUT */
} mlu_ptw_seq_kind;

/* One open container; lives on the caller's stack. */
typedef struct mlu_ptw_seq {
    int kind;           /* mlu_ptw_seq_kind */
    size_t n;           /* items announced (pairs for dicts) */
    size_t i;           /* items begun */
} mlu_ptw_seq;

/* A tensor as torch describes it; sizes in elements. */
typedef struct mlu_ptw_tensor {
    int dtype;              /* index in mlu_torch_dtypes (torch_dtypes.h) */
    size_t ndim;
    const int64_t *shape;   /* borrowed, ndim entries */
    const int64_t *stride;  /* borrowed, ndim entries */
    int64_t offset;
    int requires_grad;
    unsigned flags;         /* MLU_PT_FLAG_* (ptview.h): the keys of the metadata dict the caller writes */
    size_t storage;         /* from mlu_ptw_storage_add */
} mlu_ptw_tensor;

/* Writes PROTO 2.  mlu_ptw_free is needed after it, even when it failed. */
mlu_status mlu_ptw_init(mlu_ptw *w, mlu_error *err);
void mlu_ptw_free(mlu_ptw *w);

mlu_status mlu_ptw_none(mlu_ptw *w, mlu_error *err);
mlu_status mlu_ptw_bool(mlu_ptw *w, int v, mlu_error *err);
mlu_status mlu_ptw_int(mlu_ptw *w, int64_t v, mlu_error *err);
/* An integer beyond 64 bits: n minimal little-endian two's-complement bytes (n <= 255). */
mlu_status mlu_ptw_long_bytes(mlu_ptw *w, const unsigned char *le, size_t n, mlu_error *err);
mlu_status mlu_ptw_float(mlu_ptw *w, double v, mlu_error *err);
/* A str of n UTF-8 bytes; memoized (*memo gets the index). */
mlu_status mlu_ptw_str(mlu_ptw *w, const char *s, size_t n, uint32_t *memo, mlu_error *err);
/* A repeat of something memoized earlier. */
mlu_status mlu_ptw_get(mlu_ptw *w, uint32_t memo, mlu_error *err);

/* Containers of n items: *_begin, then mlu_ptw_item before each item (a
 * dict's item is its key then its value), then mlu_ptw_seq_end.  Dicts,
 * OrderedDicts and lists are memoized at begin (*memo), tuples at end (*memo
 * there; the empty tuple is not memoized and gets MLU_PTW_NO_MEMO). */
mlu_status mlu_ptw_dict_begin(mlu_ptw *w, mlu_ptw_seq *seq, size_t n, uint32_t *memo, mlu_error *err);
mlu_status mlu_ptw_odict_begin(mlu_ptw *w, mlu_ptw_seq *seq, size_t n, uint32_t *memo, mlu_error *err);
mlu_status mlu_ptw_list_begin(mlu_ptw *w, mlu_ptw_seq *seq, size_t n, uint32_t *memo, mlu_error *err);
mlu_status mlu_ptw_tuple_begin(mlu_ptw *w, mlu_ptw_seq *seq, size_t n, mlu_error *err);
mlu_status mlu_ptw_item(mlu_ptw *w, mlu_ptw_seq *seq, mlu_error *err);
/* memo: NULL for dicts and lists; for a tuple, where its memo index goes. */
mlu_status mlu_ptw_seq_end(mlu_ptw *w, mlu_ptw_seq *seq, uint32_t *memo, mlu_error *err);
/* After an OrderedDict's items and then its attribute dict: BUILD. */
mlu_status mlu_ptw_odict_state(mlu_ptw *w, mlu_error *err);

/* A storage of nbytes, for tensors of `dtype`; *index gets its number (its
 * key is that number in decimal, its record data/<key>).  data may be NULL
 * when the bytes come later through mlu_ptw_archive_storage. */
mlu_status mlu_ptw_storage_add(mlu_ptw *w, int dtype, uint64_t nbytes, const void *data, size_t *index,
                               mlu_error *err);
/* Another tensor of `dtype` viewing storage `index`, which it sees as nbytes:
 * MLU_EINVAL when torch could not express that. */
mlu_status mlu_ptw_storage_check(const mlu_ptw *w, size_t index, int dtype, uint64_t nbytes, mlu_error *err);

/* A tensor: _rebuild_tensor_v2 (legacy storage classes) or _rebuild_tensor_v3
 * (the rest) of its persistent id, offset, shape, stride, requires_grad and an
 * empty OrderedDict of hooks.  pid_memo[MLU_PTW_PID_*] holds the memo indexes
 * the caller already has for 'storage', the storage's key and 'cpu'
 * (MLU_PTW_NO_MEMO: write it), and gets the ones used.  With metadata, the
 * caller writes the metadata dict between mlu_ptw_tensor_begin and
 * mlu_ptw_tensor_end.  The tensor is memoized at end (*memo).  A tensor
 * the reader would refuse (ptview.h's rules: more than 64 dimensions, a
 * view outside its storage, ...) is refused: MLU_EINVAL in the rule's words. */
mlu_status mlu_ptw_tensor_begin(mlu_ptw *w, const mlu_ptw_tensor *t, uint32_t pid_memo[MLU_PTW_PID_COUNT],
                                mlu_error *err);
mlu_status mlu_ptw_tensor_end(mlu_ptw *w, uint32_t *memo, mlu_error *err);
/* A Parameter: _rebuild_parameter(<the tensor written between begin and end>,
 * requires_grad, OrderedDict()), memoized at end (*memo). */
mlu_status mlu_ptw_param_begin(mlu_ptw *w, mlu_error *err);
mlu_status mlu_ptw_param_end(mlu_ptw *w, int requires_grad, uint32_t *memo, mlu_error *err);

/* STOP: the pickle is complete. */
mlu_status mlu_ptw_pickle_end(mlu_ptw *w, mlu_error *err);
/* The pickle's bytes so far (borrowed; valid until the next pickling call). */
const char *mlu_ptw_pickle(const mlu_ptw *w, size_t *len);

/* ------------------------------------------------------------------ archive */

/* An upper bound of the whole archive's size for an archive name of
 * archive_len bytes (records, headers, padding, central directory, end
 * records); MLU_EOVERFLOW when it passes PTRDIFF_MAX. */
mlu_status mlu_ptw_archive_bound(const mlu_ptw *w, size_t archive_len, size_t *out, mlu_error *err);

/* Opens the archive on sink and writes the records before the storages. */
mlu_status mlu_ptw_archive_begin(mlu_ptw *w, const char *archive, mlu_zipw_sink sink, void *ctx,
                                 uint64_t zip64_limit, mlu_error *err);
/* Storage `index` (the next one in order), nbytes at data; nbytes must be
 * the size it was added with (MLU_EINVAL: it changed while saving). */
mlu_status mlu_ptw_archive_storage(mlu_ptw *w, size_t index, const void *data, uint64_t nbytes,
                                   mlu_error *err);
/* The records after the storages, the central directory and end records. */
mlu_status mlu_ptw_archive_finish(mlu_ptw *w, mlu_error *err);

/* Where a storage's bytes are when it was added without them: *data gets
 * nbytes readable bytes that stay valid until the next call. */
typedef mlu_status (*mlu_ptw_fetch)(void *ctx, size_t index, uint64_t nbytes, const void **data,
                                    mlu_error *err);
/* The whole archive: begin, every storage (its data pointer, or fetch when
 * that is NULL), finish. */
mlu_status mlu_ptw_archive_write(mlu_ptw *w, const char *archive, mlu_zipw_sink sink, void *ctx,
                                 uint64_t zip64_limit, mlu_ptw_fetch fetch, void *fetch_ctx, mlu_error *err);

/* ------------------------------------------------------------------ sinks */

/* Into an atomically written file (ctx: mlu_ptw_filesink); a durable one
 * starts writeback as it goes (mlu_afile_write). */
typedef struct mlu_ptw_filesink {
    mlu_afile f;        /* opened by the caller */
} mlu_ptw_filesink;
mlu_status mlu_ptw_sink_file(void *ctx, const void *p, size_t n, mlu_error *err);

/* Into a buffer of fixed capacity (ctx: mlu_ptw_memsink), e.g. one sized
 * with mlu_ptw_archive_bound; MLU_EOVERFLOW past the capacity. */
typedef struct mlu_ptw_memsink {
    char *p;            /* borrowed */
    size_t len, cap;
} mlu_ptw_memsink;
mlu_status mlu_ptw_sink_mem(void *ctx, const void *p, size_t n, mlu_error *err);

#endif
