/* offload_pool.c: size-classed, capped pool of host buffers (see offload_pool.h). */
#include "offload_pool.h"

#include <string.h>

#include "alloc.h"

typedef struct pool_block {
    void *ptr;        /* owned through the pool's allocator; NULL for a free slot */
    size_t size;      /* the class size */
    size_t requested; /* bytes asked for while in use */
    int64_t next;     /* next in the class's free list / the free-slot list; -1 ends */
    int cls;
    int in_use;
} pool_block;

struct mlu_offload_pool {
    mlu_pool_allocator alloc;
    size_t cap;
    pool_block *blocks; /* owned */
    int64_t nblocks;
    size_t capblocks;
    int64_t free_slots;                   /* unused entries of blocks[] */
    int64_t free_list[MLU_POOL_NCLASSES]; /* cached buffers per class */
    mlu_pool_stats st;
};

size_t mlu_offload_pool_class(size_t n)
{
    size_t step, r;
    int p;

    if (n <= MLU_POOL_MIN_CLASS)
        return MLU_POOL_MIN_CLASS;
    p = 63 - __builtin_clzll((unsigned long long)(n - 1)); /* 2^p < n <= 2^(p+1) */
    step = (size_t)1 << (p - 2);
    if (mlu_add_overflow_size(n, step - 1, &r))
        return 0;
    return r / step * step;
}

int mlu_offload_pool_class_index(size_t cls)
{
    int p;
    size_t step;

    if (cls <= MLU_POOL_MIN_CLASS)
        return 0;
    p = 63 - __builtin_clzll((unsigned long long)(cls - 1));
    step = (size_t)1 << (p - 2);
    /* cls / step is 5..8 for 2^p < cls <= 2^(p+1); p >= 12 here */
    return 1 + (p - 12) * 4 + (int)(cls / step - 5);
}

mlu_status mlu_offload_pool_new(const mlu_pool_allocator *alloc, size_t cap,
                                mlu_offload_pool **out, mlu_error *err)
{
    mlu_status rc = MLU_ENOMEM;
    mlu_offload_pool *pool = NULL;
    int i;

    if (alloc == NULL || alloc->alloc == NULL || alloc->free == NULL) {
        rc = mlu_error_set(err, MLU_EINVAL, -1, "offload pool: no allocator");
        goto done;
    }
    pool = (mlu_offload_pool *)mlu_calloc(1, sizeof(*pool));
    if (pool == NULL) {
        rc = mlu_error_set(err, MLU_ENOMEM, -1, "offload pool: out of memory");
        goto done;
    }
    pool->alloc = *alloc;
    if (pool->alloc.what == NULL)
        pool->alloc.what = "host memory";
    pool->cap = cap;
    pool->st.cap = cap == SIZE_MAX ? UINT64_MAX : (uint64_t)cap;
    pool->free_slots = -1;
    for (i = 0; i < MLU_POOL_NCLASSES; i++)
        pool->free_list[i] = -1;
    *out = pool;
    rc = MLU_OK;
done:
    return rc;
}

static void block_free(mlu_offload_pool *pool, int64_t id)
{
    pool_block *b = &pool->blocks[id];

    pool->alloc.free(pool->alloc.ctx, b->ptr);
    pool->st.reserved -= b->size;
    pool->st.blocks--;
    pool->st.frees++;
    b->ptr = NULL;
    b->size = 0;
    b->in_use = 0;
    b->next = pool->free_slots;
    pool->free_slots = id;
}

void mlu_offload_pool_free(mlu_offload_pool *pool)
{
    int64_t i;

    if (pool == NULL)
        return;
    for (i = 0; i < pool->nblocks; i++)
        if (pool->blocks[i].ptr != NULL)
            pool->alloc.free(pool->alloc.ctx, pool->blocks[i].ptr);
    mlu_free(pool->blocks);
    mlu_free(pool);
}

/* Frees cached buffers (largest classes first) until `need` more bytes fit
 * under the cap; returns 1 when they do. */
static int make_room(mlu_offload_pool *pool, size_t need)
{
    int c;

    for (c = MLU_POOL_NCLASSES - 1; c >= 0; c--) {
        while (pool->free_list[c] >= 0 && pool->st.reserved + need > pool->cap) {
            int64_t id = pool->free_list[c];
            pool->free_list[c] = pool->blocks[id].next;
            block_free(pool, id);
        }
    }
    return pool->st.reserved + need <= pool->cap;
}

/* A free entry of blocks[] (growing the table); -1 when out of memory. */
static int64_t take_slot(mlu_offload_pool *pool)
{
    int64_t id = -1;

    if (pool->free_slots >= 0) {
        id = pool->free_slots;
        pool->free_slots = pool->blocks[id].next;
        goto done;
    }
    if ((size_t)pool->nblocks == pool->capblocks &&
        mlu_grow((void **)&pool->blocks, &pool->capblocks, pool->capblocks + 1, sizeof(pool_block),
                 (size_t)INT64_MAX, "pool blocks", NULL) != MLU_OK)
        goto done;
    id = pool->nblocks++;
done:
    return id;
}

mlu_status mlu_offload_pool_acquire(mlu_offload_pool *pool, size_t n, int64_t *id,
                                    void **ptr, size_t *size, mlu_error *err)
{
    mlu_status rc = MLU_EINVAL;
    size_t cls = mlu_offload_pool_class(n);
    int64_t slot = -1;
    pool_block *b;
    int ci;
    void *mem;

    if (n == 0) {
        rc = mlu_error_set(err, MLU_EINVAL, -1, "offload pool: a buffer of 0 bytes");
        goto done;
    }
    if (cls == 0 || cls > (size_t)INT64_MAX) {
        rc = mlu_error_set(err, MLU_EOVERFLOW, -1, "offload pool: %zu bytes is too large", n);
        goto done;
    }
    ci = mlu_offload_pool_class_index(cls);
    if (pool->free_list[ci] >= 0) {
        slot = pool->free_list[ci];
        pool->free_list[ci] = pool->blocks[slot].next;
        pool->st.reuses++;
        goto found;
    }
    if (cls > pool->cap || !make_room(pool, cls)) {
        rc = mlu_error_set(err, MLU_ENOMEM, -1,
                           "offload pool of %s is full: cap %zu bytes, %llu bytes in use, "
                           "%zu asked (a buffer of %zu); raise the cap (max_bytes) or offload less",
                           pool->alloc.what, pool->cap, (unsigned long long)pool->st.in_use, n, cls);
        goto done;
    }
    slot = take_slot(pool);
    if (slot < 0) {
        rc = mlu_error_set(err, MLU_ENOMEM, -1, "offload pool: out of memory for its block table");
        goto done;
    }
    mem = pool->alloc.alloc(pool->alloc.ctx, cls, err);
    if (mem == NULL) {
        pool->blocks[slot].next = pool->free_slots;
        pool->blocks[slot].ptr = NULL;
        pool->free_slots = slot;
        rc = mlu_error_set(err, MLU_ENOMEM, -1, "offload pool: allocating %zu bytes of %s failed",
                           cls, pool->alloc.what);
        goto done;
    }
    b = &pool->blocks[slot];
    b->ptr = mem;
    b->size = cls;
    b->cls = ci;
    pool->st.reserved += cls;
    pool->st.blocks++;
    pool->st.allocs++;
    if (pool->st.reserved > pool->st.peak_reserved)
        pool->st.peak_reserved = pool->st.reserved;
found:
    b = &pool->blocks[slot];
    b->in_use = 1;
    b->requested = n;
    b->next = -1;
    pool->st.in_use += b->size;
    pool->st.requested += n;
    pool->st.acquires++;
    *id = slot;
    *ptr = b->ptr;
    *size = b->size;
    rc = MLU_OK;
done:
    return rc;
}

static int valid_in_use(const mlu_offload_pool *pool, int64_t id)
{
    return id >= 0 && id < pool->nblocks && pool->blocks[id].ptr != NULL && pool->blocks[id].in_use;
}

mlu_status mlu_offload_pool_release(mlu_offload_pool *pool, int64_t id, mlu_error *err)
{
    pool_block *b;

    if (!valid_in_use(pool, id))
        return mlu_error_set(err, MLU_EINVAL, -1, "offload pool: buffer %lld is not in use",
                             (long long)id);
    b = &pool->blocks[id];
    b->in_use = 0;
    pool->st.in_use -= b->size;
    pool->st.requested -= b->requested;
    b->requested = 0;
    if (pool->st.reserved > pool->cap) {
        /* the cap was lowered while this buffer was out */
        block_free(pool, id);
        return MLU_OK;
    }
    b->next = pool->free_list[b->cls];
    pool->free_list[b->cls] = id;
    return MLU_OK;
}

void *mlu_offload_pool_ptr(const mlu_offload_pool *pool, int64_t id, size_t *size)
{
    if (!valid_in_use(pool, id))
        return NULL;
    if (size != NULL)
        *size = pool->blocks[id].size;
    return pool->blocks[id].ptr;
}

uint64_t mlu_offload_pool_trim(mlu_offload_pool *pool)
{
    uint64_t before = pool->st.reserved;
    int c;

    for (c = 0; c < MLU_POOL_NCLASSES; c++) {
        while (pool->free_list[c] >= 0) {
            int64_t id = pool->free_list[c];
            pool->free_list[c] = pool->blocks[id].next;
            block_free(pool, id);
        }
    }
    return before - pool->st.reserved;
}

void mlu_offload_pool_set_cap(mlu_offload_pool *pool, size_t cap)
{
    pool->cap = cap;
    pool->st.cap = cap == SIZE_MAX ? UINT64_MAX : (uint64_t)cap;
    if (pool->st.reserved > cap)
        (void)make_room(pool, 0);
}

void mlu_offload_pool_stats(const mlu_offload_pool *pool, mlu_pool_stats *out)
{
    *out = pool->st;
}

mlu_status mlu_offload_pool_check(const mlu_offload_pool *pool, mlu_error *err)
{
    uint64_t reserved = 0, in_use = 0, requested = 0, blocks = 0, listed = 0, cached = 0;
    int64_t i, j;
    int c;

    for (i = 0; i < pool->nblocks; i++) {
        const pool_block *b = &pool->blocks[i];
        if (b->ptr == NULL)
            continue;
        blocks++;
        reserved += b->size;
        if (b->size != mlu_offload_pool_class(b->size) || mlu_offload_pool_class_index(b->size) != b->cls)
            return mlu_error_set(err, MLU_EFORMAT, -1, "block %lld: size %zu is not its class",
                                 (long long)i, b->size);
        if (b->in_use) {
            in_use += b->size;
            requested += b->requested;
            if (b->requested == 0 || b->requested > b->size ||
                mlu_offload_pool_class(b->requested) != b->size)
                return mlu_error_set(err, MLU_EFORMAT, -1, "block %lld: request %zu in a buffer of %zu",
                                     (long long)i, b->requested, b->size);
        } else {
            cached++;
        }
    }
    for (c = 0; c < MLU_POOL_NCLASSES; c++) {
        for (j = pool->free_list[c]; j >= 0; j = pool->blocks[j].next) {
            if (j >= pool->nblocks || pool->blocks[j].ptr == NULL || pool->blocks[j].in_use ||
                pool->blocks[j].cls != c || ++listed > (uint64_t)pool->nblocks)
                return mlu_error_set(err, MLU_EFORMAT, -1, "free list %d is corrupt", c);
        }
    }
    if (listed != cached)
        return mlu_error_set(err, MLU_EFORMAT, -1, "%llu cached buffers, %llu on free lists",
                             (unsigned long long)cached, (unsigned long long)listed);
    if (reserved != pool->st.reserved || in_use != pool->st.in_use ||
        requested != pool->st.requested || blocks != pool->st.blocks)
        return mlu_error_set(err, MLU_EFORMAT, -1, "pool counters disagree with its blocks");
    if (reserved > pool->cap && in_use < reserved)
        return mlu_error_set(err, MLU_EFORMAT, -1, "cached buffers over the cap");
    if (pool->st.peak_reserved < reserved)
        return mlu_error_set(err, MLU_EFORMAT, -1, "peak below current");
    return MLU_OK;
}
