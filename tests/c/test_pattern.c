/* test_pattern.c: the pure-C pattern core (layouts, checks, tables, gather). */
#include <stdint.h>
#include <string.h>

#include "mlu_test.h"
#include "core/alloc.h"
#include "core/pattern.h"

/* "t,q;t,q|..." rendering of a layout, steps separated by '|'. */
static void render(const mlu_pattern *p, char *out, size_t cap)
{
    size_t n = 0;
    int64_t s, i;

    out[0] = 0;
    for (s = 0; s < p->n_steps; s++) {
        if (s > 0)
            n += (size_t)snprintf(out + n, cap - n, "|");
        for (i = p->step_start[s]; i < p->step_start[s + 1]; i++)
            n += (size_t)snprintf(out + n, cap - n, "%s%lld,%lld", i > p->step_start[s] ? ";" : "",
                                  (long long)p->t[i], (long long)p->q[i]);
    }
}

static void test_delayed(void)
{
    mlu_pattern p;
    mlu_error err;
    int64_t delays[3] = {0, 1, 2};
    char buf[512];
    int64_t idx[3 * 5];
    uint8_t mask[3 * 5];

    mlu_error_clear(&err);
    mlu_pattern_init(&p, 3, 4);
    CHECK(mlu_pattern_delayed(&p, delays, 0, 0, &err) == MLU_OK);
    render(&p, buf, sizeof(buf));
    CHECK_STR(buf, "|0,0|1,0;0,1|2,0;1,1;0,2|3,0;2,1;1,2|4,0;3,1;2,2|5,0;4,1;3,2");
    CHECK(p.max_delay == 2 && p.valid_steps == 5);
    CHECK(mlu_pattern_ref_steps(&p, 1) == 5);
    CHECK(mlu_pattern_build_indexes(&p, 4, 3, 1, idx, mask, &err) == MLU_OK);
    CHECK(idx[0] == 12 && idx[1] == 0 && idx[4] == 3 && idx[5 + 2] == 4 && idx[10 + 3] == 8);
    CHECK(mask[0] == 0 && mask[1] == 1 && mask[10 + 2] == 0);
    CHECK(mlu_pattern_build_indexes(&p, 5, 3, 1, idx, mask, &err) == MLU_EINVAL);
    CHECK(strstr(err.text, "timesteps") != NULL);
    mlu_error_clear(&err);
    CHECK(mlu_pattern_build_indexes(&p, 4, 2, 1, idx, mask, &err) == MLU_EINVAL);
    mlu_pattern_free(&p);

    /* no leading special step */
    mlu_error_clear(&err);
    mlu_pattern_init(&p, 3, 2);
    CHECK(mlu_pattern_delayed(&p, delays, 0, -1, &err) == MLU_OK);
    render(&p, buf, sizeof(buf));
    CHECK_STR(buf, "0,0|1,0;0,1|2,0;1,1;0,2|3,0;2,1;1,2");
    mlu_pattern_free(&p);

    /* unsorted delays */
    mlu_error_clear(&err);
    delays[2] = 0;
    mlu_pattern_init(&p, 3, 2);
    CHECK(mlu_pattern_delayed(&p, delays, 0, 0, &err) == MLU_EINVAL);
    CHECK(strstr(err.text, "sorted") != NULL);
    mlu_pattern_free(&p);
}

static void test_unrolled(void)
{
    mlu_pattern p;
    mlu_error err;
    int64_t flat[3] = {0, 1, 1}, delays[3] = {0, 3, 3};
    char buf[512];

    mlu_error_clear(&err);
    mlu_pattern_init(&p, 3, 4);
    CHECK(mlu_pattern_unrolled(&p, flat, delays, &err) == MLU_OK);
    render(&p, buf, sizeof(buf));
    CHECK_STR(buf, "|0,0|1,0|2,0|0,1;0,2|3,0|1,1;1,2|4,0|2,1;2,2|5,0|3,1;3,2|6,0");
    mlu_pattern_free(&p);

    delays[2] = 4; /* inconsistent with codebook 1 at the same inner step */
    mlu_error_clear(&err);
    mlu_pattern_init(&p, 3, 4);
    CHECK(mlu_pattern_unrolled(&p, flat, delays, &err) == MLU_EINVAL);
    CHECK(strstr(err.text, "inconsistent") != NULL);
    mlu_pattern_free(&p);
}

static void test_coarse_musiclm(void)
{
    mlu_pattern p;
    mlu_error err;
    int64_t delays[2] = {0, 1};
    char buf[512];

    mlu_error_clear(&err);
    mlu_pattern_init(&p, 3, 2);
    CHECK(mlu_pattern_coarse_first(&p, delays, &err) == MLU_OK);
    render(&p, buf, sizeof(buf));
    CHECK_STR(buf, "|0,0|1,0|0,1|1,1;0,2|2,1;1,2");
    mlu_pattern_free(&p);

    mlu_error_clear(&err);
    mlu_pattern_init(&p, 4, 2);
    CHECK(mlu_pattern_musiclm(&p, 2, &err) == MLU_OK);
    render(&p, buf, sizeof(buf));
    CHECK_STR(buf, "|0,0|0,1|1,0|1,1|0,2|0,3|1,2|1,3");
    mlu_pattern_free(&p);

    mlu_error_clear(&err);
    mlu_pattern_init(&p, 3, 2);
    CHECK(mlu_pattern_musiclm(&p, 2, &err) == MLU_EINVAL); /* codebook 3 of 3 */
    CHECK(strstr(err.text, "outside") != NULL);
    mlu_pattern_free(&p);
}

static void test_checks_and_revert(void)
{
    mlu_pattern p;
    mlu_error err;
    int64_t idx[4];
    uint8_t mask[4];

    /* a codebook going back in time */
    mlu_error_clear(&err);
    mlu_pattern_init(&p, 1, 2);
    CHECK(mlu_pattern_add_step(&p, &err) == MLU_OK);
    CHECK(mlu_pattern_add_step(&p, &err) == MLU_OK);
    CHECK(mlu_pattern_add_coord(&p, 1, 0, &err) == MLU_OK);
    CHECK(mlu_pattern_add_step(&p, &err) == MLU_OK);
    CHECK(mlu_pattern_add_coord(&p, 0, 0, &err) == MLU_OK);
    CHECK(mlu_pattern_finish(&p, &err) == MLU_EINVAL);
    CHECK(strstr(err.text, "Past timesteps") != NULL);
    mlu_pattern_free(&p);

    /* two entries for one codebook in a step */
    mlu_error_clear(&err);
    mlu_pattern_init(&p, 2, 2);
    CHECK(mlu_pattern_add_step(&p, &err) == MLU_OK);
    CHECK(mlu_pattern_add_coord(&p, 0, 1, &err) == MLU_OK);
    CHECK(mlu_pattern_add_coord(&p, 1, 1, &err) == MLU_OK);
    CHECK(mlu_pattern_finish(&p, &err) == MLU_EINVAL);
    CHECK(strstr(err.text, "Multiple entries") != NULL);
    mlu_pattern_free(&p);

    /* empty layout */
    mlu_error_clear(&err);
    mlu_pattern_init(&p, 2, 2);
    CHECK(mlu_pattern_finish(&p, &err) == MLU_EINVAL);
    mlu_pattern_free(&p);

    /* revert of [] | (0,0) | (1,0) with and without the model-output shift */
    mlu_error_clear(&err);
    mlu_pattern_init(&p, 1, 2);
    CHECK(mlu_pattern_add_step(&p, &err) == MLU_OK);
    CHECK(mlu_pattern_add_step(&p, &err) == MLU_OK);
    CHECK(mlu_pattern_add_coord(&p, 0, 0, &err) == MLU_OK);
    CHECK(mlu_pattern_add_step(&p, &err) == MLU_OK);
    CHECK(mlu_pattern_add_coord(&p, 1, 0, &err) == MLU_OK);
    CHECK(mlu_pattern_finish(&p, &err) == MLU_OK);
    CHECK(mlu_pattern_revert_indexes(&p, 3, 1, 0, 0, idx, mask, &err) == MLU_OK);
    CHECK(idx[0] == 1 && idx[1] == 2 && mask[0] && mask[1]);
    CHECK(mlu_pattern_revert_indexes(&p, 3, 1, 0, 1, idx, mask, &err) == MLU_OK);
    CHECK(idx[0] == 0 && idx[1] == 1);
    CHECK(mlu_pattern_revert_indexes(&p, 1, 1, 0, 0, idx, mask, &err) == MLU_OK);
    CHECK(idx[0] == 1 && idx[1] == 1 && !mask[0] && !mask[1]); /* beyond S: special */
    CHECK(mlu_pattern_revert_indexes(&p, 4, 1, 0, 0, idx, mask, &err) == MLU_EINVAL);
    mlu_pattern_free(&p);
}

static void test_runs_and_gather(void)
{
    int64_t idx[8] = {0, 1, 2, 6, 6, 4, 5, 3};
    int64_t runs[16];
    int64_t n = mlu_pattern_runs(idx, 8, 6, runs, 8);
    int32_t src[2 * 6] = {10, 11, 12, 13, 14, 15, 20, 21, 22, 23, 24, 25};
    int32_t dst[2 * 8], special = -7;
    int32_t want[2 * 8] = {10, 11, 12, -7, -7, 14, 15, 13, 20, 21, 22, -7, -7, 24, 25, 23};

    CHECK(n == 4);
    CHECK(runs[0] == 0 && runs[1] == 3 && runs[2] == -1 && runs[3] == 2 && runs[4] == 4 &&
          runs[5] == 2 && runs[6] == 3 && runs[7] == 1);
    mlu_pattern_gather(src, 2, 6, 4, runs, n, 8, &special, dst);
    CHECK(memcmp(dst, want, sizeof(want)) == 0);
}

static void test_alloc_failures(void)
{
    int64_t flat[3] = {0, 1, 1}, delays[3] = {0, 2, 2};
    long n;
    int failures = 0, successes = 0;

    for (n = 0; n < 40; n++) {
        mlu_pattern p;
        mlu_error err;
        mlu_status st;

        mlu_error_clear(&err);
        mlu_pattern_init(&p, 3, 300);
        mlu_alloc_fail_after(n);
        st = mlu_pattern_unrolled(&p, flat, delays, &err);
        mlu_alloc_fail_after(-1);
        if (st == MLU_ENOMEM)
            failures++;
        else if (st == MLU_OK)
            successes++;
        else
            CHECK(0);
        mlu_pattern_free(&p);
    }
    CHECK(failures > 0 && successes > 0);
}

int main(void)
{
    test_delayed();
    test_unrolled();
    test_coarse_musiclm();
    test_checks_and_revert();
    test_runs_and_gather();
    test_alloc_failures();
    return TEST_DONE("test_pattern");
}
