/* test_offload_pool.c: the offload pool's bookkeeping against a fake allocator:
 * size classes, reuse, the cap and its error, allocator failures, and a
 * randomised run checking every invariant after each step. */
#include <stdint.h>

#include "mlu_test.h"
#include "core/alloc.h"
#include "core/offload_pool.h"

typedef struct fake {
    long live;          /* allocations not yet freed */
    uint64_t live_bytes;
    long calls;
    long fail_at;       /* the call number that fails; -1 never */
} fake;

static void *fake_alloc(void *ctx, size_t n, mlu_error *err)
{
    fake *f = (fake *)ctx;
    unsigned char *p;

    f->calls++;
    if (f->fail_at >= 0 && f->calls == f->fail_at) {
        mlu_error_set(err, MLU_ENOMEM, -1, "fake allocator refuses");
        return NULL;
    }
    p = (unsigned char *)malloc(n);
    if (p == NULL)
        return NULL;
    memset(p, 0xAB, n < 64 ? n : 64);
    f->live++;
    f->live_bytes += n;
    return p;
}

static size_t g_sizes_n;
static struct { void *p; size_t n; } g_sizes[4096];

static void *fake_alloc_tracked(void *ctx, size_t n, mlu_error *err)
{
    void *p = fake_alloc(ctx, n, err);
    if (p != NULL && g_sizes_n < 4096) {
        g_sizes[g_sizes_n].p = p;
        g_sizes[g_sizes_n].n = n;
        g_sizes_n++;
    }
    return p;
}

static void fake_free(void *ctx, void *p)
{
    fake *f = (fake *)ctx;
    size_t i;

    for (i = 0; i < g_sizes_n; i++) {
        if (g_sizes[i].p == p) {
            f->live_bytes -= g_sizes[i].n;
            g_sizes[i] = g_sizes[--g_sizes_n];
            break;
        }
    }
    f->live--;
    free(p);
}

static mlu_pool_allocator make_alloc(fake *f)
{
    mlu_pool_allocator a = {fake_alloc_tracked, fake_free, f, "fake memory"};
    memset(f, 0, sizeof(*f));
    f->fail_at = -1;
    return a;
}

static void test_classes(void)
{
    size_t n, prev = 0;
    int prev_idx = -1;

    CHECK(mlu_offload_pool_class(1) == 4096);
    CHECK(mlu_offload_pool_class(4096) == 4096);
    CHECK(mlu_offload_pool_class(4097) == 5120);
    CHECK(mlu_offload_pool_class(8192) == 8192);
    CHECK(mlu_offload_pool_class(8193) == 10240);
    CHECK(mlu_offload_pool_class((size_t)1 << 30) == (size_t)1 << 30);
    CHECK(mlu_offload_pool_class(SIZE_MAX) == 0);
    CHECK(mlu_offload_pool_class_index(4096) == 0);
    CHECK(mlu_offload_pool_class_index(5120) == 1);
    /* classes are monotone, >= n, at most 25% above n, indices strictly rising */
    for (n = 1; n < ((size_t)1 << 26); n = n * 9 / 8 + 1) {
        size_t c = mlu_offload_pool_class(n);
        int idx = mlu_offload_pool_class_index(c);
        CHECK(c >= n);
        CHECK(n <= 4096 || (c - n) * 4 <= n);
        CHECK(c >= prev);
        CHECK(mlu_offload_pool_class(c) == c);
        CHECK(idx >= prev_idx && idx < MLU_POOL_NCLASSES);
        if (c != prev)
            CHECK(idx > prev_idx || prev == 0);
        prev = c;
        prev_idx = idx;
    }
    CHECK(mlu_offload_pool_class_index(mlu_offload_pool_class((size_t)INT64_MAX)) < MLU_POOL_NCLASSES);
}

static void test_reuse_and_cap(void)
{
    fake f;
    mlu_pool_allocator a = make_alloc(&f);
    mlu_offload_pool *pool = NULL;
    mlu_error err;
    mlu_pool_stats s;
    int64_t id1, id2, id3;
    void *p1, *p2, *p3;
    size_t z1, z2, z3;

    mlu_error_clear(&err);
    CHECK(mlu_offload_pool_new(&a, 64 * 1024, &pool, &err) == MLU_OK);
    CHECK(mlu_offload_pool_acquire(pool, 10000, &id1, &p1, &z1, &err) == MLU_OK);
    CHECK(z1 == 10240 && f.live == 1);
    CHECK(mlu_offload_pool_release(pool, id1, &err) == MLU_OK);
    /* same class: the same buffer comes back, no allocator call */
    CHECK(mlu_offload_pool_acquire(pool, 9000, &id2, &p2, &z2, &err) == MLU_OK);
    CHECK(p2 == p1 && id2 == id1 && f.calls == 1);
    mlu_offload_pool_stats(pool, &s);
    CHECK(s.reuses == 1 && s.allocs == 1 && s.in_use == 10240 && s.requested == 9000);
    /* double release is refused */
    CHECK(mlu_offload_pool_release(pool, id2, &err) == MLU_OK);
    mlu_error_clear(&err);
    CHECK(mlu_offload_pool_release(pool, id2, &err) == MLU_EINVAL);
    CHECK(strstr(err.text, "not in use") != NULL);
    mlu_error_clear(&err);
    CHECK(mlu_offload_pool_release(pool, 999, &err) == MLU_EINVAL);
    /* a request over the cap names the cap */
    mlu_error_clear(&err);
    CHECK(mlu_offload_pool_acquire(pool, 100000, &id3, &p3, &z3, &err) == MLU_ENOMEM);
    CHECK(strstr(err.text, "cap 65536") != NULL && strstr(err.text, "fake memory") != NULL);
    /* the cached 10240 buffer is evicted to make room for the 65536 class of 60000 bytes */
    CHECK(mlu_offload_pool_acquire(pool, 60000, &id3, &p3, &z3, &err) == MLU_OK);
    CHECK(z3 == 65536 && f.live == 1 && f.live_bytes == 65536);
    mlu_error_clear(&err);
    CHECK(mlu_offload_pool_acquire(pool, 5000, &id1, &p1, &z1, &err) == MLU_ENOMEM);
    CHECK(strstr(err.text, "65536 bytes in use") != NULL);
    CHECK(mlu_offload_pool_check(pool, &err) == MLU_OK);
    /* lowering the cap under a buffer in use frees it at release */
    mlu_offload_pool_set_cap(pool, 8192);
    CHECK(mlu_offload_pool_release(pool, id3, &err) == MLU_OK);
    CHECK(f.live == 0);
    CHECK(mlu_offload_pool_check(pool, &err) == MLU_OK);
    mlu_offload_pool_free(pool);
    CHECK(f.live == 0);
}

static void test_alloc_failures(void)
{
    fake f;
    mlu_pool_allocator a = make_alloc(&f);
    mlu_offload_pool *pool = NULL;
    mlu_error err;
    int64_t id;
    void *p;
    size_t z;
    long n;

    mlu_error_clear(&err);
    CHECK(mlu_offload_pool_new(&a, SIZE_MAX, &pool, &err) == MLU_OK);
    f.fail_at = 1;
    CHECK(mlu_offload_pool_acquire(pool, 100, &id, &p, &z, &err) == MLU_ENOMEM);
    CHECK(strstr(err.text, "fake allocator refuses") != NULL);
    CHECK(mlu_offload_pool_check(pool, &err) == MLU_OK);
    f.fail_at = -1;
    mlu_error_clear(&err);
    CHECK(mlu_offload_pool_acquire(pool, 100, &id, &p, &z, &err) == MLU_OK);
    CHECK(mlu_offload_pool_acquire(pool, 0, &id, &p, &z, &err) == MLU_EINVAL);
    mlu_offload_pool_free(pool); /* frees the buffer still in use */
    CHECK(f.live == 0);
    /* the core's own allocations (pool struct, block table) failing */
    for (n = 0; n < 4; n++) {
        mlu_offload_pool *q = NULL;
        int i;
        mlu_alloc_fail_after(n);
        mlu_error_clear(&err);
        if (mlu_offload_pool_new(&a, SIZE_MAX, &q, &err) == MLU_OK) {
            for (i = 0; i < 100; i++)
                if (mlu_offload_pool_acquire(q, 5000, &id, &p, &z, &err) != MLU_OK)
                    break;
            mlu_alloc_fail_after(-1);
            CHECK(mlu_offload_pool_check(q, &err) == MLU_OK);
            mlu_offload_pool_free(q);
        }
        mlu_alloc_fail_after(-1);
        CHECK(f.live == 0);
    }
}

static uint64_t rng_state = 88172645463325252ULL;
static uint64_t rnd(void)
{
    return mlu_test_rand(&rng_state);
}

/* Random acquire/release/trim/cap changes; invariants after every step, and
 * buffers in use never overlap (each is filled with its id and checked). */
static void test_random(void)
{
    enum { LIVE = 64 };
    fake f;
    mlu_pool_allocator a = make_alloc(&f);
    mlu_offload_pool *pool = NULL;
    mlu_error err;
    int64_t ids[LIVE];
    unsigned char *ptrs[LIVE];
    size_t lens[LIVE];
    int nlive = 0, step, bad = 0, over = 0;

    mlu_error_clear(&err);
    CHECK(mlu_offload_pool_new(&a, 4 << 20, &pool, &err) == MLU_OK);
    for (step = 0; step < 20000; step++) {
        uint64_t r = rnd() % 100;
        mlu_pool_stats s;
        if (r < 50 && nlive < LIVE) {
            size_t n = 1 + (size_t)(rnd() % (1u << (rnd() % 20)));
            int64_t id;
            void *p;
            size_t z;
            mlu_error_clear(&err);
            if (mlu_offload_pool_acquire(pool, n, &id, &p, &z, &err) == MLU_OK) {
                if (z < n)
                    bad++;
                memset(p, (int)(id & 0xff), n);
                ids[nlive] = id;
                ptrs[nlive] = (unsigned char *)p;
                lens[nlive] = n;
                nlive++;
            } else {
                over++;
                if (err.code != MLU_ENOMEM)
                    bad++;
            }
        } else if (r < 95 && nlive > 0) {
            int k = (int)(rnd() % (uint64_t)nlive);
            size_t i;
            for (i = 0; i < lens[k]; i++)
                if (ptrs[k][i] != (unsigned char)(ids[k] & 0xff)) {
                    bad++;
                    break;
                }
            if (mlu_offload_pool_release(pool, ids[k], &err) != MLU_OK)
                bad++;
            ids[k] = ids[nlive - 1];
            ptrs[k] = ptrs[nlive - 1];
            lens[k] = lens[nlive - 1];
            nlive--;
        } else if (r < 97) {
            mlu_offload_pool_trim(pool);
        } else {
            mlu_offload_pool_set_cap(pool, (size_t)(1 + rnd() % 8) << 20);
        }
        mlu_error_clear(&err);
        if (mlu_offload_pool_check(pool, &err) != MLU_OK) {
            fprintf(stderr, "step %d: %s\n", step, err.text);
            bad++;
            break;
        }
        mlu_offload_pool_stats(pool, &s);
        if (s.reserved != f.live_bytes || (long)s.blocks != f.live)
            bad++;
        if (s.reserved > s.cap && s.reserved != s.in_use)
            bad++;
    }
    CHECK(bad == 0);
    CHECK(over > 0); /* the cap was exercised */
    mlu_offload_pool_free(pool);
    CHECK(f.live == 0 && f.live_bytes == 0);
}

int main(void)
{
    test_classes();
    test_reuse_and_cap();
    test_alloc_failures();
    test_random();
    return TEST_DONE("test_offload_pool");
}
