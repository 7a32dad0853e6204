/* sampler.c: key schedule, keyed bijection, sharding and batch packing
 * (see sampler.h for the definitions every function here implements). */
#include "sampler.h"

#include <math.h>

#include "alloc.h"

#define GOLDEN 0x9E3779B97F4A7C15ULL

/* The block pass is the hot loop: let GCC vectorise it fully and, on x86-64,
 * also emit an AVX2 version picked at load time (results are identical: it
 * is the same 32-bit integer arithmetic). */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define MLU_VECTOR_LOOP __attribute__((optimize("O3"), target_clones("avx512f", "avx2", "default")))
#elif defined(__GNUC__) && !defined(__clang__)
#define MLU_VECTOR_LOOP __attribute__((optimize("O3")))
#else
#define MLU_VECTOR_LOOP
#endif
#define BLOCK 256

uint64_t mlu_mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

uint64_t mlu_sampler_key(uint64_t seed, uint64_t stream, uint64_t epoch)
{
    return mlu_mix64(mlu_mix64(mlu_mix64(seed) ^ stream) + epoch);
}

static inline uint32_t hash32(uint32_t x)
{
    x ^= x >> 16;
    x *= 0x7FEB352DU;
    x ^= x >> 15;
    x *= 0x846CA68BU;
    x ^= x >> 16;
    return x;
}

void mlu_perm_init(mlu_perm *p, uint64_t n, uint64_t seed, uint64_t stream, uint64_t epoch)
{
    uint64_t s = mlu_sampler_key(seed, stream, epoch);
    unsigned h = 0;
    int i;

    /* smallest h with 4^h >= n (h <= 32 since n <= 2^64 - 1) */
    while (h < 32 && (((uint64_t)1 << (2 * h)) < n))
        h++;
    p->n = n;
    p->half = h;
    p->mask = h == 32 ? 0xFFFFFFFFU : (uint32_t)(((uint64_t)1 << h) - 1);
    p->rounds = h <= MLU_PERM_SMALL_HALF ? MLU_PERM_ROUNDS_SMALL : MLU_PERM_ROUNDS_LARGE;
    for (i = 0; i < (int)p->rounds; i++) {
        s += GOLDEN;
        p->keys[i] = (uint32_t)(mlu_mix64(s) >> 32);
    }
}

/* One pass of the Feistel network over the 4^half domain. */
static inline uint64_t feistel(const mlu_perm *p, uint64_t x)
{
    uint32_t l = (uint32_t)(x >> p->half), r = (uint32_t)(x & p->mask);
    int i;

    for (i = 0; i < (int)p->rounds; i += 2) {
        l ^= hash32(r ^ p->keys[i]) & p->mask;
        r ^= hash32(l ^ p->keys[i + 1]) & p->mask;
    }
    return ((uint64_t)l << p->half) | r;
}

uint64_t mlu_perm_apply(const mlu_perm *p, uint64_t x)
{
    if (p->n <= 1)
        return x;
    do
        x = feistel(p, x);
    while (x >= p->n);
    return x;
}

/* The Feistel pass over a block, written as flat loops over arrays so the
 * compiler vectorises the rounds; cycle walking is done after, per item. */
MLU_VECTOR_LOOP static void feistel_block(const mlu_perm *p, uint64_t *xs, size_t count)
{
    uint32_t l[BLOCK], r[BLOCK];
    const uint32_t mask = p->mask;
    const unsigned half = p->half;
    size_t j;
    int i;

    for (j = 0; j < count; j++) {
        l[j] = (uint32_t)(xs[j] >> half);
        r[j] = (uint32_t)(xs[j] & mask);
    }
    for (i = 0; i < (int)p->rounds; i += 2) {
        const uint32_t k0 = p->keys[i], k1 = p->keys[i + 1];
        for (j = 0; j < count; j++)
            l[j] ^= hash32(r[j] ^ k0) & mask;
        for (j = 0; j < count; j++)
            r[j] ^= hash32(l[j] ^ k1) & mask;
    }
    for (j = 0; j < count; j++)
        xs[j] = ((uint64_t)l[j] << half) | r[j];
}

void mlu_perm_apply_many(const mlu_perm *p, uint64_t *xs, size_t count)
{
    uint64_t walk[BLOCK];
    uint32_t where[BLOCK];
    size_t off, j, m, w;

    if (p->n <= 1)
        return;
    for (off = 0; off < count; off += m) {
        uint64_t *x = xs + off;
        m = count - off < BLOCK ? count - off : BLOCK;
        feistel_block(p, x, m);
        /* cycle walking, still by blocks: gather what fell outside [0, n),
         * pass it through the network again, write every result back and
         * keep only those still outside, until none is left */
        w = 0;
        for (j = 0; j < m; j++) {
            walk[w] = x[j];
            where[w] = (uint32_t)j;
            w += x[j] >= p->n;
        }
        while (w > 0) {
            size_t kept = 0;
            feistel_block(p, walk, w);
            for (j = 0; j < w; j++) {
                const uint64_t v = walk[j];
                const uint32_t at = where[j];
                x[at] = v;
                walk[kept] = v;
                where[kept] = at;
                kept += v >= p->n;
            }
            w = kept;
        }
    }
}

mlu_status mlu_shard_init(mlu_shard *s, uint64_t n, uint64_t base, uint64_t world,
                          uint64_t rank, int drop_last, mlu_error *err)
{
    uint64_t rest;

    if (n > MLU_SAMPLER_MAX_N)
        return mlu_error_set(err, MLU_EINVAL, -1, "length %llu is too large (at most 2**63 - 1)",
                             (unsigned long long)n);
    if (world < 1 || world > MLU_SAMPLER_MAX_WORLD)
        return mlu_error_set(err, MLU_EINVAL, -1, "world_size must be in [1, 2**31], got %llu",
                             (unsigned long long)world);
    if (rank >= world)
        return mlu_error_set(err, MLU_EINVAL, -1, "rank %llu is not below world_size %llu",
                             (unsigned long long)rank, (unsigned long long)world);
    if (base > n)
        return mlu_error_set(err, MLU_EINVAL, -1, "consumed position %llu is past the length %llu",
                             (unsigned long long)base, (unsigned long long)n);
    rest = n - base;
    s->n = n;
    s->base = base;
    s->world = world;
    s->rank = rank;
    s->drop_last = drop_last ? 1 : 0;
    s->count = rest / world + (!drop_last && rest % world != 0 ? 1 : 0);
    return MLU_OK;
}

uint64_t mlu_shard_position(const mlu_shard *s, uint64_t k)
{
    /* k < count, so q < base + rest + world <= n + 2^31: no overflow */
    uint64_t q = s->base + s->rank + k * s->world;
    if (q >= s->n)
        q = (q - s->n) % s->n;
    return q;
}

mlu_status mlu_cursor_init(mlu_cursor *c, uint64_t n, uint64_t seed, uint64_t stream,
                           int shuffle, int drop_last, uint64_t world, uint64_t rank,
                           mlu_error *err)
{
    mlu_status st = mlu_shard_init(&c->shard, n, 0, world, rank, drop_last, err);

    if (st != MLU_OK)
        return st;
    c->seed = seed;
    c->stream = stream;
    c->epoch = 0;
    c->shuffle = shuffle ? 1 : 0;
    c->k = 0;
    mlu_perm_init(&c->perm, n, seed, stream, 0);
    return MLU_OK;
}

mlu_status mlu_cursor_seek(mlu_cursor *c, uint64_t epoch, uint64_t base, uint64_t k,
                           mlu_error *err)
{
    mlu_shard s;
    mlu_status st = mlu_shard_init(&s, c->shard.n, base, c->shard.world, c->shard.rank,
                                   c->shard.drop_last, err);

    if (st != MLU_OK)
        return st;
    if (k > s.count)
        return mlu_error_set(err, MLU_EINVAL, -1,
                             "index %llu is past the %llu draws this rank has in the epoch",
                             (unsigned long long)k, (unsigned long long)s.count);
    c->shard = s;
    c->k = k;
    if (epoch != c->epoch) {
        c->epoch = epoch;
        mlu_perm_init(&c->perm, s.n, c->seed, c->stream, epoch);
    }
    return MLU_OK;
}

/* Positions [k0, k0 + count) of the shard into u. */
static void fill_positions(const mlu_shard *s, uint64_t k0, size_t count, uint64_t *u)
{
    uint64_t q, left;
    size_t j = 0, run;

    while (j < count) {
        /* a run of positions q, q + world, ... that stays below n */
        q = mlu_shard_position(s, k0 + j);
        left = q < s->n ? (s->n - 1 - q) / s->world + 1 : 1;
        run = count - j < left ? count - j : (size_t)left;
        for (; run > 0; run--, j++, q += s->world)
            u[j] = q;
    }
}

void mlu_cursor_fill(const mlu_cursor *c, uint64_t k0, size_t count, int64_t *out)
{
    uint64_t *u = (uint64_t *)out;
    size_t off, m;

    /* block by block, so the permutation works on positions still in L1 */
    for (off = 0; off < count; off += m) {
        m = count - off < BLOCK ? count - off : BLOCK;
        fill_positions(&c->shard, k0 + off, m, u + off);
        if (c->shuffle)
            mlu_perm_apply_many(&c->perm, u + off, m);
    }
}

uint64_t mlu_cursor_consumed(const mlu_cursor *c)
{
    uint64_t done;
    if (mlu_mul_overflow_u64(c->k, c->shard.world, &done) ||
        mlu_add_overflow_u64(done, c->shard.base, &done) || done > c->shard.n)
        return c->shard.n;
    return done;
}

mlu_status mlu_batch_pack(const double *durations, size_t n, double max_duration,
                          uint64_t max_batch_size, int use_max_size, int drop_last,
                          int64_t **offsets, size_t *nbatches, mlu_error *err)
{
    mlu_status st = MLU_EINVAL;
    int64_t *off = NULL;
    size_t nb = 0, i, start = 0, bytes;
    double running = 0.0;

    *offsets = NULL;
    *nbatches = 0;
    if (isnan(max_duration) || max_duration < 0) {
        mlu_error_set(err, MLU_EINVAL, -1, "max_duration must be >= 0, got %g", max_duration);
        goto error;
    }
    if (max_duration == 0 && max_batch_size == 0) {
        mlu_error_set(err, MLU_EINVAL, -1,
                      "max_duration and max_batch_size cannot both be 0 (0 means no limit)");
        goto error;
    }
    if (n == 0) {
        mlu_error_set(err, MLU_EINVAL, -1, "buckets hold no items");
        goto error;
    }
    if (n > MLU_SAMPLER_MAX_N || mlu_add_overflow_size(n, 1, &bytes) ||
        mlu_mul_overflow_size(bytes, sizeof(int64_t), &bytes)) {
        st = mlu_error_set(err, MLU_EOVERFLOW, -1, "too many items (%zu)", n);
        goto error;
    }
    for (i = 0; i < n; i++) {
        if (isnan(durations[i]) || durations[i] < 0 || isinf(durations[i])) {
            mlu_error_set(err, MLU_EINVAL, (int64_t)i,
                          "duration of item %zu must be finite and >= 0, got %g", i, durations[i]);
            goto error;
        }
    }
    off = mlu_malloc(bytes);
    if (off == NULL) {
        st = mlu_error_set(err, MLU_ENOMEM, -1, "out of memory packing %zu items", n);
        goto error;
    }
    off[0] = 0;
    for (i = 0; i < n; i++) {
        double d = durations[i];
        int flush = 0;
        if (max_duration > 0 && running + d > max_duration)
            flush = 1;
        else if (max_batch_size > 0 && (uint64_t)(i - start) >= max_batch_size)
            flush = 1;
        if (flush && i > start) {
            off[++nb] = (int64_t)i;
            start = i;
            running = 0.0;
        }
        if (use_max_size)
            running = d * (double)(i - start + 1);
        else
            running += d;
    }
    if (!drop_last)
        off[++nb] = (int64_t)n;
    *offsets = off;
    *nbatches = nb;
    off = NULL;
    st = MLU_OK;
error:
    mlu_free(off);
    return st;
}
