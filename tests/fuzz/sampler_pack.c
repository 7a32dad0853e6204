/* sampler_pack.c: fuzz harness for the sampler core: batch packing over
 * untrusted durations and limits, the keyed permutation, and a cursor seeked
 * to an arbitrary (epoch, base, k) state as a restored sampler state does.
 *
 * Checks, besides not crashing or leaking:
 *  - packing: offsets start at 0, grow strictly, end at n (or before, with
 *    drop_last); no batch is over max_batch_size, and a batch of more than
 *    one item stays within max_duration (summed the way the packer sums);
 *    invalid limits or durations are refused with MLU_EINVAL;
 *  - the permutation of [0, n) is a bijection;
 *  - a cursor hands out items in [0, n); without shuffle, rank r's draw k
 *    is base + r + k * world (wrapped). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/alloc.h"
#include "core/sampler.h"

typedef struct reader {
    const uint8_t *p;
    size_t n;
} reader;

static uint64_t take(reader *r, size_t bytes)
{
    uint64_t v = 0;
    size_t i;
    for (i = 0; i < bytes && r->n > 0; i++, r->p++, r->n--)
        v |= (uint64_t)r->p[0] << (8 * i);
    return v;
}

static double take_double(reader *r, int raw)
{
    uint64_t bits;
    double d;
    if (!raw)
        return (double)take(r, 1) / 8.0;
    bits = take(r, 8);
    memcpy(&d, &bits, sizeof(d));
    return d;
}

static void check_pack(reader *r, unsigned flags)
{
    int use_max_size = flags & 1, drop_last = (flags >> 1) & 1, raw = (flags >> 2) & 1;
    double max_duration = take_double(r, raw);
    uint64_t max_batch = take(r, 1);
    size_t n = 0, cap = r->n + 1, b, nb = 0, i;
    double *dur = mlu_malloc(cap * sizeof(double));
    int64_t *off = NULL;
    int bad = 0;
    mlu_error err;

    if (dur == NULL)
        return;
    if (max_batch == 255)
        max_batch = UINT64_MAX;
    while (r->n > 0 && n < cap) {
        dur[n] = take_double(r, raw);
        if (isnan(dur[n]) || isinf(dur[n]) || dur[n] < 0)
            bad = 1;
        n++;
    }
    if (isnan(max_duration) || max_duration < 0 || (max_duration == 0 && max_batch == 0) || n == 0)
        bad = 1;
    mlu_error_clear(&err);
    if (mlu_batch_pack(dur, n, max_duration, max_batch, use_max_size, drop_last, &off, &nb, &err) !=
        MLU_OK) {
        if (off != NULL || nb != 0 || err.text[0] == '\0')
            abort();
        if (err.code != MLU_ENOMEM && (err.code != MLU_EINVAL || !bad))
            abort();
        goto done;
    }
    if (bad || off == NULL || off[0] != 0)
        abort();
    if (!drop_last && off[nb] != (int64_t)n)
        abort();
    if (off[nb] > (int64_t)n)
        abort();
    for (b = 0; b < nb; b++) {
        int64_t lo = off[b], hi = off[b + 1];
        double running = 0;
        if (hi <= lo)
            abort(); /* never an empty batch */
        if (max_batch > 0 && (uint64_t)(hi - lo) > max_batch)
            abort();
        for (i = (size_t)lo; i < (size_t)hi; i++) {
            if (max_duration > 0 && i > (size_t)lo && running + dur[i] > max_duration)
                abort(); /* this item should have started a new batch */
            running = use_max_size ? dur[i] * (double)(i - (size_t)lo + 1) : running + dur[i];
        }
    }
done:
    mlu_free(off);
    mlu_free(dur);
}

static void check_perm(reader *r)
{
    uint64_t n = take(r, 2) % 5000, seed = take(r, 8), stream = take(r, 1), epoch = take(r, 2), x;
    mlu_perm p;
    uint8_t *seen = mlu_calloc(n ? (size_t)n : 1, 1);

    if (seen == NULL)
        return;
    mlu_perm_init(&p, n, seed, stream, epoch);
    for (x = 0; x < n; x++) {
        uint64_t y = mlu_perm_apply(&p, x);
        if (y >= n || seen[y])
            abort();
        seen[y] = 1;
    }
    mlu_free(seen);
}

static void check_cursor(reader *r, unsigned flags)
{
    int shuffle = flags & 1, drop_last = (flags >> 1) & 1;
    /* lengths near 2^63 too, where the arithmetic is tightest */
    uint64_t n = (flags & 4) ? INT64_MAX - take(r, 2) : take(r, 3);
    uint64_t world = take(r, 4), rank = take(r, 4), seed = take(r, 8), epoch = take(r, 2);
    uint64_t base = take(r, 8), k = take(r, 8), count, want, j;
    int64_t out[64];
    mlu_cursor c;
    mlu_error err;

    if (!(flags & 8) && world > 0) {
        world = world % 4096 + 1;
        rank %= world;
    }
    if (n > 0 && !(flags & 16))
        base %= n + 1;
    mlu_error_clear(&err);
    if (mlu_cursor_init(&c, n, seed, 7, shuffle, drop_last, world, rank, &err) != MLU_OK) {
        if (err.code != MLU_EINVAL || (n <= MLU_SAMPLER_MAX_N && world >= 1 && world <= MLU_SAMPLER_MAX_WORLD && rank < world))
            abort();
        return;
    }
    {
        /* the count the seek will check k against */
        uint64_t rest = base <= n ? n - base : 0;
        count = rest / world + (!drop_last && rest % world != 0 ? 1 : 0);
        if (count > 0 && !(flags & 32))
            k %= count + 1;
    }
    mlu_error_clear(&err);
    if (mlu_cursor_seek(&c, epoch, base, k, &err) != MLU_OK) {
        if (err.code != MLU_EINVAL || (base <= n && k <= count))
            abort();
        return;
    }
    if (base > n || k > count || c.shard.count != count)
        abort();
    want = count - k < 64 ? count - k : 64;
    mlu_cursor_fill(&c, k, (size_t)want, out);
    for (j = 0; j < want; j++) {
        uint64_t pos = base + rank + (k + j) * world;
        if ((uint64_t)out[j] >= n)
            abort();
        if (!shuffle && (uint64_t)out[j] != (pos >= n ? (pos - n) % n : pos))
            abort();
    }
    if (mlu_cursor_consumed(&c) > n)
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    reader r = {data, size};
    unsigned flags = (unsigned)take(&r, 1);

    switch (flags >> 6) {
    case 0:
    case 1:
        check_pack(&r, flags);
        break;
    case 2:
        check_perm(&r);
        break;
    default:
        check_cursor(&r, flags);
        break;
    }
    return 0;
}

#include "pt_replay.h"
