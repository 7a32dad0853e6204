/* Unit tests of the sampler core: bijection, shard arithmetic, batch packing. */
#include <math.h>
#include <stdlib.h>

#include "mlu_test.h"
#include "core/alloc.h"
#include "core/sampler.h"

/* every n up to a few hundred, a few seeds: apply and apply_many are one bijection */
static void test_bijection(void)
{
    uint64_t n, seed, i;
    uint64_t *xs = malloc(1000 * sizeof(uint64_t));
    unsigned char *seen = malloc(1000);
    mlu_perm p;
    int ok;

    for (n = 0; n < 600; n += (n < 70 ? 1 : 37)) {
        for (seed = 0; seed < 3; seed++) {
            mlu_perm_init(&p, n, seed, 1, seed * 7);
            memset(seen, 0, 1000);
            ok = 1;
            for (i = 0; i < n; i++)
                xs[i] = i;
            mlu_perm_apply_many(&p, xs, (size_t)n);
            for (i = 0; i < n; i++) {
                if (xs[i] >= n || seen[xs[i]] || xs[i] != mlu_perm_apply(&p, i))
                    ok = 0;
                else
                    seen[xs[i]] = 1;
            }
            CHECK(ok);
        }
    }
    /* the largest length: the walk terminates and stays in range */
    mlu_perm_init(&p, MLU_SAMPLER_MAX_N, 5, 1, 0);
    CHECK(p.half == 32 && p.rounds == MLU_PERM_ROUNDS_LARGE);
    for (i = 0; i < 100; i++)
        CHECK(mlu_perm_apply(&p, MLU_SAMPLER_MAX_N - 1 - i) < MLU_SAMPLER_MAX_N);
    mlu_perm_init(&p, 5, 5, 1, 0);
    CHECK(p.half == 2 && p.rounds == MLU_PERM_ROUNDS_SMALL);
    free(xs);
    free(seen);
}

static void test_shards(void)
{
    mlu_shard s;
    mlu_error err;
    uint64_t n, w, r, k, total;
    int drop;

    mlu_error_clear(&err);
    CHECK(mlu_shard_init(&s, 10, 0, 3, 3, 0, &err) == MLU_EINVAL && strstr(err.text, "rank"));
    mlu_error_clear(&err);
    CHECK(mlu_shard_init(&s, 10, 0, 0, 0, 0, &err) == MLU_EINVAL && strstr(err.text, "world_size"));
    mlu_error_clear(&err);
    CHECK(mlu_shard_init(&s, 10, 11, 1, 0, 0, &err) == MLU_EINVAL);
    mlu_error_clear(&err);
    CHECK(mlu_shard_init(&s, MLU_SAMPLER_MAX_N + 1, 0, 1, 0, 0, &err) == MLU_EINVAL);
    for (n = 1; n < 40; n++) {
        for (w = 1; w < 9; w++) {
            for (drop = 0; drop < 2; drop++) {
                unsigned hits[40] = {0};
                total = 0;
                for (r = 0; r < w; r++) {
                    mlu_error_clear(&err);
                    CHECK(mlu_shard_init(&s, n, 0, w, r, drop, &err) == MLU_OK);
                    CHECK(s.count == (drop ? n / w : (n + w - 1) / w));
                    for (k = 0; k < s.count; k++) {
                        uint64_t q = mlu_shard_position(&s, k);
                        CHECK(q < n);
                        hits[q]++;
                        total++;
                    }
                }
                for (k = 0; k < n; k++)
                    CHECK(drop ? hits[k] <= 1 : hits[k] >= 1);
                CHECK(total == s.count * w);
            }
        }
    }
}

static void test_cursor(void)
{
    mlu_cursor c;
    mlu_error err;
    int64_t a[50], b[50];
    size_t j;

    mlu_error_clear(&err);
    CHECK(mlu_cursor_init(&c, 50, 9, 1, 1, 0, 4, 1, &err) == MLU_OK);
    CHECK(c.shard.count == 13);
    mlu_cursor_fill(&c, 0, 13, a);
    for (j = 0; j < 13; j++) {
        mlu_cursor_fill(&c, j, 1, b);
        CHECK(b[0] == a[j]);
    }
    /* seek to the rest of the epoch after 20 global positions */
    CHECK(mlu_cursor_seek(&c, 0, 20, 0, &err) == MLU_OK && c.shard.count == 8);
    CHECK(mlu_cursor_seek(&c, 0, 20, 9, &err) == MLU_EINVAL);
    c.k = 3;
    CHECK(mlu_cursor_consumed(&c) == 32);
    c.k = 8;
    CHECK(mlu_cursor_consumed(&c) == 50);
}

static void test_pack(void)
{
    const double d[] = {1, 1, 1, 1, 1, 2, 2, 2, 2};
    const double bad[] = {1, NAN};
    int64_t *off = NULL;
    size_t nb = 0;
    mlu_error err;

    mlu_error_clear(&err);
    CHECK(mlu_batch_pack(d, 9, 4.0, 0, 1, 1, &off, &nb, &err) == MLU_OK);
    CHECK(nb == 3 && off[0] == 0 && off[1] == 4 && off[2] == 6 && off[3] == 8);
    mlu_free(off);
    CHECK(mlu_batch_pack(d, 9, 4.0, 0, 1, 0, &off, &nb, &err) == MLU_OK);
    CHECK(nb == 4 && off[4] == 9);
    mlu_free(off);
    CHECK(mlu_batch_pack(d, 9, 0.0, 2, 0, 0, &off, &nb, &err) == MLU_OK && nb == 5);
    mlu_free(off);
    CHECK(mlu_batch_pack(d, 9, 0.0, 0, 1, 0, &off, &nb, &err) == MLU_EINVAL && off == NULL);
    mlu_error_clear(&err);
    CHECK(mlu_batch_pack(bad, 2, 1.0, 0, 1, 0, &off, &nb, &err) == MLU_EINVAL && err.offset == 1);
    mlu_error_clear(&err);
    CHECK(mlu_batch_pack(d, 0, 1.0, 0, 1, 0, &off, &nb, &err) == MLU_EINVAL);
    mlu_error_clear(&err);
    CHECK(mlu_batch_pack(d, 9, -1.0, 0, 1, 0, &off, &nb, &err) == MLU_EINVAL);
    mlu_error_clear(&err);
    mlu_alloc_fail_after(0);
    CHECK(mlu_batch_pack(d, 9, 4.0, 0, 1, 0, &off, &nb, &err) == MLU_ENOMEM && off == NULL);
    mlu_alloc_fail_after(-1);
}

int main(void)
{
    test_bijection();
    test_shards();
    test_cursor();
    test_pack();
    return TEST_DONE("test_sampler");
}
