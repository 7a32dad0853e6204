/* offload_pool.h: the bookkeeping of the activation-offload host buffer pool.
 *
 * Pure C: the memory itself comes from an allocator given by the caller
 * (cudaHostAlloc for pinned memory in csrc/cuda/offload.cu, malloc for the
 * CPU engine, a fake one in tests/c/test_offload_pool.c).  The pool keeps the
 * buffers it handed back and hands them out again (reuse across steps).
 *
 * Size classes: a request of n bytes gets a buffer of mlu_offload_pool_class(n)
 * bytes: 4096 for n <= 4096, else n rounded up to a multiple of 2^(p-2) where
 * 2^p < n <= 2^(p+1), i.e. at most 25% more than asked, four classes per
 * power of two.  Free buffers wait on one list per class.
 *
 * Cap: the bytes the pool holds (in use plus cached) never exceed `cap`.  A
 * request that would go over first frees cached buffers of other classes;
 * when that is not enough it fails with MLU_ENOMEM and a message giving the
 * cap, the bytes in use and the size asked.
 *
 * Blocks are named by an id (>= 0) rather than by address, so release is
 * O(1) and a stale or doubled release is detected.  Not thread-safe: the
 * caller serialises calls. */
#ifndef MLU_OFFLOAD_POOL_H
#define MLU_OFFLOAD_POOL_H

#include "../mlu.h"

#ifdef __cplusplus
extern "C" {
#endif

#define MLU_POOL_MIN_CLASS ((size_t)4096)
#define MLU_POOL_NCLASSES 256

/* Where the pool's memory comes from.  alloc returns NULL and fills err on
 * failure; free is never called with NULL. */
typedef struct mlu_pool_allocator {
    void *(*alloc)(void *ctx, size_t nbytes, mlu_error *err);
    void (*free)(void *ctx, void *ptr);
    void *ctx;
    const char *what; /* "pinned host memory", ... for messages (static string) */
} mlu_pool_allocator;

typedef struct mlu_pool_stats {
    uint64_t cap;            /* the cap in bytes (UINT64_MAX: none) */
    uint64_t reserved;       /* bytes allocated and held (in use + cached) */
    uint64_t in_use;         /* bytes of the buffers handed out */
    uint64_t requested;      /* bytes asked for by the buffers handed out */
    uint64_t peak_reserved;  /* highest `reserved` seen */
    uint64_t blocks;         /* buffers held */
    uint64_t acquires;       /* successful acquire calls */
    uint64_t reuses;         /* ... of which served from a free list */
    uint64_t allocs;         /* allocator calls that succeeded */
    uint64_t frees;          /* allocator frees */
} mlu_pool_stats;

typedef struct mlu_offload_pool mlu_offload_pool;

/* The class (buffer size) of a request of n bytes; 0 when it overflows. */
size_t mlu_offload_pool_class(size_t n);
/* Index of the class of size `cls` (a value of mlu_offload_pool_class). */
int mlu_offload_pool_class_index(size_t cls);

/* A new empty pool; cap is the byte limit (SIZE_MAX: none).  *out is set on
 * success only. */
mlu_status mlu_offload_pool_new(const mlu_pool_allocator *alloc, size_t cap,
                                mlu_offload_pool **out, mlu_error *err);
/* Frees every buffer, in use or not, and the pool (NULL is fine). */
void mlu_offload_pool_free(mlu_offload_pool *pool);

/* A buffer of at least n bytes (n > 0): *id names it, *ptr its memory,
 * *size its real size. */
mlu_status mlu_offload_pool_acquire(mlu_offload_pool *pool, size_t n, int64_t *id,
                                    void **ptr, size_t *size, mlu_error *err);
/* Gives buffer `id` back to its free list (MLU_EINVAL when it is not in use). */
mlu_status mlu_offload_pool_release(mlu_offload_pool *pool, int64_t id, mlu_error *err);
/* The memory of an in-use buffer (NULL when id is not in use). */
void *mlu_offload_pool_ptr(const mlu_offload_pool *pool, int64_t id, size_t *size);
/* Frees every cached (not in use) buffer; returns the bytes freed. */
uint64_t mlu_offload_pool_trim(mlu_offload_pool *pool);
/* Changes the cap (cached buffers are freed as needed; buffers in use stay). */
void mlu_offload_pool_set_cap(mlu_offload_pool *pool, size_t cap);
void mlu_offload_pool_stats(const mlu_offload_pool *pool, mlu_pool_stats *out);

/* Checks every internal invariant (for tests); MLU_OK or MLU_EFORMAT saying which. */
mlu_status mlu_offload_pool_check(const mlu_offload_pool *pool, mlu_error *err);

#ifdef __cplusplus
}
#endif
#endif
