/* offload_pool.c: fuzz harness for the activation-offload pool bookkeeping.
 *
 * The input is a program: each byte pair is an operation (acquire of a size
 * drawn from the input, release of a live buffer, trim, a new cap, a failing
 * allocator call) on a pool over a counting fake allocator.  Checks, besides
 * not crashing or leaking:
 *  - mlu_offload_pool_check holds after every operation;
 *  - the pool's reserved bytes and block count equal what the fake
 *    allocator holds; cached bytes never sit over the cap;
 *  - a granted buffer is at least the size asked, at most 25% more (or 4096),
 *    and no two live buffers overlap (each is stamped and re-checked);
 *  - refusals are MLU_ENOMEM (cap or allocator) or MLU_EOVERFLOW, with a message;
 *  - one pass with a core allocation failing (fuzz_oom.h) leaks nothing. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/alloc.h"
#include "core/offload_pool.h"
#include "fuzz_oom.h"

enum { LIVE = 32 };

typedef struct fake {
    long live, calls, fail_at;
    uint64_t bytes;
} fake;

static void *fake_alloc(void *ctx, size_t n, mlu_error *err)
{
    fake *f = (fake *)ctx;
    size_t *p;

    if (++f->calls == f->fail_at) {
        mlu_error_set(err, MLU_ENOMEM, -1, "fake allocator refuses");
        return NULL;
    }
    /* a small real allocation, the size kept in front: the pool never
     * touches more than the stamp bytes the harness writes */
    p = (size_t *)malloc(sizeof(size_t) + 16);
    if (p == NULL) {
        mlu_error_set(err, MLU_ENOMEM, -1, "malloc failed");
        return NULL;
    }
    p[0] = n;
    f->live++;
    f->bytes += n;
    return p + 1;
}

static void fake_free(void *ctx, void *ptr)
{
    fake *f = (fake *)ctx;
    size_t *p = (size_t *)ptr - 1;

    f->live--;
    f->bytes -= p[0];
    free(p);
}

static void run(const uint8_t *data, size_t size, int reliable)
{
    fake f = {0, 0, -1, 0};
    mlu_pool_allocator a = {fake_alloc, fake_free, &f, "fuzz memory"};
    mlu_offload_pool *pool = NULL;
    int64_t ids[LIVE];
    unsigned char *ptrs[LIVE];
    int nlive = 0;
    size_t i;
    mlu_error err;
    mlu_pool_stats s;

    mlu_error_clear(&err);
    if (mlu_offload_pool_new(&a, size > 0 && data[0] & 1 ? (size_t)data[0] << 14 : SIZE_MAX, &pool, &err) != MLU_OK) {
        if (reliable || err.code != MLU_ENOMEM)
            abort();
        return;
    }
    for (i = 1; i + 1 < size; i += 2) {
        unsigned op = data[i] >> 5, arg = ((unsigned)data[i] & 31) << 8 | data[i + 1];
        mlu_error_clear(&err);
        if (op <= 2 && nlive < LIVE) {
            size_t n = op == 2 ? (size_t)arg << (arg & 31) : (size_t)arg << (op * 6);
            int64_t id;
            void *p;
            size_t z;
            if (op == 2 && arg == 8191)
                n = SIZE_MAX - 3;
            if (mlu_offload_pool_acquire(pool, n, &id, &p, &z, &err) == MLU_OK) {
                if (n == 0 || z < n || (n > 4096 && (z - n) > n / 4) || (n <= 4096 && z != 4096))
                    abort();
                ptrs[nlive] = (unsigned char *)p;
                ids[nlive] = id;
                memset(p, (int)(id & 0xff), 16);
                nlive++;
            } else if (err.text[0] == '\0' ||
                       !(err.code == MLU_ENOMEM || err.code == MLU_EOVERFLOW || (err.code == MLU_EINVAL && n == 0))) {
                abort();
            }
        } else if (op <= 5 && nlive > 0) {
            int k = (int)(arg % (unsigned)nlive), j;
            for (j = 0; j < 16; j++)
                if (ptrs[k][j] != (unsigned char)(ids[k] & 0xff))
                    abort();
            if (mlu_offload_pool_release(pool, ids[k], &err) != MLU_OK)
                abort();
            if (mlu_offload_pool_release(pool, ids[k], &err) != MLU_EINVAL)
                abort();
            ids[k] = ids[nlive - 1];
            ptrs[k] = ptrs[nlive - 1];
            nlive--;
        } else if (op == 6) {
            if (arg & 1)
                mlu_offload_pool_trim(pool);
            else
                mlu_offload_pool_set_cap(pool, arg ? (size_t)arg << 12 : SIZE_MAX);
        } else {
            f.fail_at = f.calls + 1 + (arg & 3);
        }
        mlu_error_clear(&err);
        if (mlu_offload_pool_check(pool, &err) != MLU_OK)
            abort();
        mlu_offload_pool_stats(pool, &s);
        if (s.reserved != f.bytes || (long)s.blocks != f.live || s.in_use > s.reserved)
            abort();
        if (s.reserved > s.cap && s.reserved != s.in_use)
            abort();
    }
    mlu_offload_pool_free(pool);
    if (f.live != 0 || f.bytes != 0)
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    FUZZ_WITH_OOM(run, data, size);
    return 0;
}

#include "pt_replay.h"
