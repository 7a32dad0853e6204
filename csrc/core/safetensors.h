/* safetensors.h: the safetensors format, without Python.
 *
 * Layout: [u64 little-endian N][N bytes of UTF-8 JSON header][data buffer].
 * The reader validates an untrusted header in a fixed order (see
 * mlu_st_parse); the writer lays tensors out as the reference writer does
 * (dtype descending, then name by byte) and writes byte-identical headers. */
#ifndef MLU_SAFETENSORS_H
#define MLU_SAFETENSORS_H

#include "../mlu.h"
#include "buf.h"

/* The dtype codes, in the reference's declaration order (the order decides
 * the writer's tensor order). */
typedef enum mlu_st_dtype {
    MLU_ST_BOOL = 0,
    MLU_ST_F4,
    MLU_ST_F6_E2M3,
    MLU_ST_F6_E3M2,
    MLU_ST_U8,
    MLU_ST_I8,
    MLU_ST_F8_E5M2,
    MLU_ST_F8_E4M3,
    MLU_ST_F8_E8M0,
    MLU_ST_F8_E4M3FNUZ,
    MLU_ST_F8_E5M2FNUZ,
    MLU_ST_I16,
    MLU_ST_U16,
    MLU_ST_F16,
    MLU_ST_BF16,
    MLU_ST_I32,
    MLU_ST_U32,
    MLU_ST_F32,
    MLU_ST_C64,
    MLU_ST_F64,
    MLU_ST_I64,
    MLU_ST_U64,
    MLU_ST_DTYPE_COUNT
} mlu_st_dtype;

/* Largest header (N) a reader accepts and a writer produces. */
#define MLU_ST_MAX_HEADER 100000000u

/* One safetensors dtype, as the format defines it.  What it is in torch,
 * NumPy and ml_dtypes is not repeated here: torch_dtypes.c's table names the
 * safetensors dtype of each torch dtype, and mlu_torch_dtype_of_safetensors
 * joins the two (tests/c/test_safetensors.c checks that they agree). */
typedef struct mlu_st_dtype_info {
    const char *name;  /* the header's name ("F32") */
    uint8_t bits;      /* bits per element: 4 (F4), 6 (F6_*), 8, 16, 32 or 64 */
} mlu_st_dtype_info;

/* The table, indexed by mlu_st_dtype code. */
extern const mlu_st_dtype_info mlu_st_dtypes[MLU_ST_DTYPE_COUNT];

/* The code's name ("F32"), or NULL for an out-of-range code. */
const char *mlu_st_dtype_name(int dtype);
/* The code of a name of n bytes, or -1 when unknown. */
int mlu_st_dtype_from_name(const char *name, size_t n);
/* Bits per element (4, 6, 8, 16, 32 or 64), or 0 for an out-of-range code. */
unsigned mlu_st_dtype_bits(int dtype);

/* One tensor of a parsed header. */
typedef struct mlu_st_tensor {
    char *name;        /* owned, NUL-terminated (may hold NULs: use name_len) */
    size_t name_len;
    int dtype;
    size_t ndim;
    uint64_t *shape;   /* owned; NULL when ndim == 0 */
    uint64_t begin;    /* byte offsets relative to data_start */
    uint64_t end;
} mlu_st_tensor;

/* One metadata pair (strings owned, NUL-terminated, lengths exact). */
typedef struct mlu_st_meta {
    char *key;
    size_t key_len;
    char *value;
    size_t value_len;
} mlu_st_meta;

typedef struct mlu_st_header {
    uint64_t header_len;     /* N */
    uint64_t data_start;     /* 8 + N: file offset of the data buffer */
    int has_metadata;        /* 1 when __metadata__ was present */
    size_t nmeta;
    mlu_st_meta *meta;       /* owned; in the header's order */
    size_t ntensors;
    mlu_st_tensor *tensors;  /* owned; sorted by (begin, end, name) */
} mlu_st_header;

/* Parses and validates the file whose `size` bytes are at `data`: every rule
 * of the reference reader, plus duplicate keys rejected.  Only the first
 * 8 + N bytes are read (N the header length, checked against size first:
 * when it is refused, only the first 8), so `data` may hold just those.  On failure err has
 * MLU_EFORMAT (or MLU_ENOMEM) and the byte offset in the file when known; h
 * is left empty.  Free h with mlu_st_header_free on success. */
mlu_status mlu_st_parse(const uint8_t *data, uint64_t size, mlu_st_header *h, mlu_error *err);
void mlu_st_header_free(mlu_st_header *h);

/* ------------------------------------------------------------------ arrays */

/* The most dimensions a tensor read as an array may have: NumPy's
 * NPY_MAXDIMS (NumPy 2).  The writer refuses more, as the reader does. */
#define MLU_ST_MAX_NDIM 64

/* The NumPy array the reader makes of a tensor of `shape` and `dtype`: its
 * elements are bits/8 bytes, and for the sub-byte dtypes (F4, F6_*) single
 * bytes, the last dimension scaled by bits/8 when that is whole, else one
 * dimension holding all the packed bytes.  Fills dims[0..*nd), *elsize and
 * *nbytes (the data's size).  Refuses (MLU_EINVAL) in the reader's words,
 * in this order: what the header rules refuse (an element count or bit size
 * beyond 64 bits, a size that is not whole bytes), then what NumPy and
 * torch cannot hold: more than MLU_ST_MAX_NDIM dimensions, a dimension above
 * 2^63-1, an array of more than 2^63-1 bytes counting its non-zero
 * dimensions only (NumPy's rule).  The reader calls it for each array it
 * makes and the writer for each tensor, so the writer writes nothing the
 * reader refuses, and says so in the same words. */
mlu_status mlu_st_array_shape(const char *name, size_t name_len, int dtype, size_t ndim,
                              const uint64_t *shape, uint64_t dims[MLU_ST_MAX_NDIM], size_t *nd,
                              unsigned *elsize, uint64_t *nbytes, mlu_error *err);

/* ------------------------------------------------------------------ writing */

/* A tensor to write: everything borrowed from the caller. */
typedef struct mlu_st_entry {
    const char *name;
    size_t name_len;
    int dtype;
    size_t ndim;
    const uint64_t *shape;
    const void *data;
    uint64_t nbytes;
    uint64_t begin;      /* set by mlu_st_build_header */
} mlu_st_entry;

/* A metadata pair to write (borrowed). */
typedef struct mlu_st_kv {
    const char *key;
    size_t key_len;
    const char *value;
    size_t value_len;
} mlu_st_kv;

/* Puts the entries in file order (sorted in place), checks each (reserved
 * name, what mlu_st_array_shape refuses, size = shape x dtype) and writes
 * the 8-byte length and the space-padded JSON header into `out`.  Metadata
 * is written (its keys sorted in place) when has_metadata.  *data_len
 * receives the size of the data buffer. */
mlu_status mlu_st_build_header(mlu_st_entry *entries, size_t n, mlu_st_kv *meta, size_t nmeta,
                               int has_metadata, mlu_buf *out, uint64_t *data_len,
                               mlu_error *err);

/* Writes header + each entry's bytes (in the order given) to `path`
 * atomically; afile_flags are mlu_afile_open's (MLU_AFILE_DURABLE: fsynced,
 * with writeback started as it goes).  Touches no Python: callers may
 * release the GIL. */
mlu_status mlu_st_write_file(const char *path, const void *header, size_t header_len,
                             const mlu_st_entry *entries, size_t n, unsigned afile_flags,
                             mlu_error *err);

/* ------------------------------------------------------------------ files */

/* Reads and validates the header of the file open on fd, whose size is
 * `size` (mlu_file_open_ro's), with pread: a file that shrank meanwhile is
 * MLU_EFORMAT, never SIGBUS.  As mlu_st_parse otherwise. */
mlu_status mlu_st_read_header(int fd, uint64_t size, mlu_st_header *h, mlu_error *err);

#endif
