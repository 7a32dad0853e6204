/* sampler.h: the pure-C core of mlutils' samplers.
 *
 * Everything here is deterministic integer arithmetic, identical on every
 * machine, compiler and Python version.  Three pieces:
 *
 * 1. The generator (key schedule).  Round keys come from SplitMix64:
 *        mix64(z): z = (z ^ z>>30) * 0xBF58476D1CE4E5B9;
 *                  z = (z ^ z>>27) * 0x94D049BB133111EB;  return z ^ z>>31
 *        next(s):  s += 0x9E3779B97F4A7C15;  return mix64(s)
 *    The stream of a (seed, stream, epoch) triple starts from
 *        s0 = mix64(mix64(mix64(seed) ^ stream) + epoch)
 *    and round key i (0-based) is the high 32 bits of the (i+1)th next(s).
 *    `stream` separates the kinds of sampler, `epoch` is the epoch (or, for
 *    the pool sampler, the round).
 *
 * 2. The keyed bijection on [0, n): a balanced Feistel network over the
 *    domain [0, 4^h), 4^h the smallest power of 4 >= n, with h-bit halves
 *    (h <= 32).  A value x splits into L = x >> h and R = x & (2^h - 1);
 *    round i does L ^= F(R ^ key_i) & mask, the next round R ^= F(L ^ key_i+1)
 *    & mask, alternating: 12 rounds when h <= 8 (n <= 65536), else 6.  F is a 32-bit
 *    avalanche hash:  x ^= x>>16; x *= 0x7FEB352D; x ^= x>>15;
 *    x *= 0x846CA68B; x ^= x>>16.  A Feistel network is a bijection of the
 *    domain whatever F is; cycle walking (apply again while the result is
 *    >= n) restricts it to a bijection of [0, n).  The domain is < 4n, so a
 *    walk takes fewer than 4 steps on average in the worst case and about 2
 *    on average over n.  n <= 1 is the identity.
 *
 * 3. Sharding.  An epoch's order is a sequence of n positions; a segment
 *    starts after `base` positions were consumed globally and is dealt to
 *    `world` ranks round-robin, as torch's DistributedSampler deals:
 *    rank r's kth position is base + r + k*world.  Every rank gets the same
 *    count: floor(rest / world) with drop_last (the tail is dropped), else
 *    ceil(rest / world), positions past the end wrapping to the start of the
 *    epoch (padding by repetition).  After every rank consumed k positions,
 *    base + k*world positions of the order are consumed globally, which is
 *    what lets any other world size continue the epoch.
 *
 * Batch packing (mlu_batch_pack) is the greedy rule of the original
 * BatchedOrderedSampler; every batch is a contiguous range of item indices.
 */
#ifndef MLU_SAMPLER_H
#define MLU_SAMPLER_H

#include "../mlu.h"

/* Rounds of the Feistel network: small halves need more of them to look
 * random (a round function on a few bits has few choices). */
#define MLU_PERM_ROUNDS_SMALL 12  /* halves of at most MLU_PERM_SMALL_HALF bits (n <= 65536) */
#define MLU_PERM_ROUNDS_LARGE 6   /* larger halves */
#define MLU_PERM_SMALL_HALF 8
#define MLU_PERM_MAX_ROUNDS MLU_PERM_ROUNDS_SMALL
/* Largest length a sampler accepts (positions and items fit in int64). */
#define MLU_SAMPLER_MAX_N ((uint64_t)INT64_MAX)
#define MLU_SAMPLER_MAX_WORLD ((uint64_t)1 << 31)

uint64_t mlu_mix64(uint64_t z);
/* The SplitMix64 starting state of (seed, stream, epoch), see above. */
uint64_t mlu_sampler_key(uint64_t seed, uint64_t stream, uint64_t epoch);

typedef struct mlu_perm {
    uint64_t n;       /* the bijection permutes [0, n) */
    unsigned half;    /* bits per Feistel half; the domain is 4^half >= n */
    uint32_t mask;    /* 2^half - 1 */
    unsigned rounds;  /* even: MLU_PERM_ROUNDS_SMALL or MLU_PERM_ROUNDS_LARGE */
    uint32_t keys[MLU_PERM_MAX_ROUNDS];
} mlu_perm;

void mlu_perm_init(mlu_perm *p, uint64_t n, uint64_t seed, uint64_t stream, uint64_t epoch);
/* The image of x (x < n).  The scalar definition of the permutation: the
 * library itself only calls mlu_perm_apply_many, and the C tests
 * (tests/c/test_sampler.c) and the sampler_pack fuzz harness check that
 * one against this one, item by item. */
uint64_t mlu_perm_apply(const mlu_perm *p, uint64_t x);
/* In place: xs[i] = apply(xs[i]) for every i (each xs[i] < n). */
void mlu_perm_apply_many(const mlu_perm *p, uint64_t *xs, size_t count);

typedef struct mlu_shard {
    uint64_t n;      /* positions in the epoch's order */
    uint64_t base;   /* positions consumed globally before this segment (<= n) */
    uint64_t world;  /* ranks (>= 1) */
    uint64_t rank;   /* < world */
    int drop_last;
    uint64_t count;  /* positions every rank gets in this segment */
} mlu_shard;

/* Checks and fills s.  MLU_EINVAL (naming the argument) on bad input. */
mlu_status mlu_shard_init(mlu_shard *s, uint64_t n, uint64_t base, uint64_t world,
                          uint64_t rank, int drop_last, mlu_error *err);
/* The epoch position of the rank's kth draw (k < count). */
uint64_t mlu_shard_position(const mlu_shard *s, uint64_t k);

/* A rank's walk through an epoch: the shard, and the order (a keyed
 * bijection when shuffle, else the identity). */
typedef struct mlu_cursor {
    mlu_shard shard;
    mlu_perm perm;
    uint64_t seed;
    uint64_t stream;
    uint64_t epoch;
    int shuffle;
    uint64_t k;      /* draws this rank made in the segment (<= shard.count) */
} mlu_cursor;

mlu_status mlu_cursor_init(mlu_cursor *c, uint64_t n, uint64_t seed, uint64_t stream,
                           int shuffle, int drop_last, uint64_t world, uint64_t rank,
                           mlu_error *err);
/* Moves to (epoch, base, k) keeping everything else; checks base <= n and
 * k <= the new count. */
mlu_status mlu_cursor_seek(mlu_cursor *c, uint64_t epoch, uint64_t base, uint64_t k,
                           mlu_error *err);
/* out[j] = the item of draw k0 + j, for j < count (k0 + count <= shard.count). */
void mlu_cursor_fill(const mlu_cursor *c, uint64_t k0, size_t count, int64_t *out);
/* Global positions consumed when every rank made k draws (capped at n). */
uint64_t mlu_cursor_consumed(const mlu_cursor *c);

/* Greedy packing of n items with the given durations into batches.
 * Before an item is added the open batch is closed when max_duration > 0 and
 * running + duration > max_duration, or else when max_batch_size > 0 and the
 * batch holds max_batch_size items; a closed batch is never empty.  running
 * is duration * len(batch) after adding (use_max_size) or the plain sum.  The
 * final open batch is kept only when !drop_last.  A limit of 0 means none;
 * both 0, a negative or NaN limit or duration, or n == 0 is MLU_EINVAL.
 * *offsets (owned by the caller, free with mlu_free) gets nbatches + 1
 * entries: batch b holds items [offsets[b], offsets[b+1]). */
mlu_status mlu_batch_pack(const double *durations, size_t n, double max_duration,
                          uint64_t max_batch_size, int use_max_size, int drop_last,
                          int64_t **offsets, size_t *nbatches, mlu_error *err);

#endif
