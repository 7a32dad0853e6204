/* test_offload_window.c: the bound on copies in flight, against fake copies
 * that finish when the test says: finished ones leave from the front, the
 * oldest ones are waited for only while over the limit, never the newest
 * alone, handles are waited on oldest first, a failing
 * callback's error comes back, allocation failure while growing is clean,
 * and a randomised run checks the bound after every push. */
#include <stdint.h>

#include "mlu_test.h"
#include "core/alloc.h"
#include "core/offload_window.h"

#define MAXH 4096

typedef struct fake {
    int done[MAXH];        /* the copy of handle i finished */
    int ordered[MAXH];     /* it was waited for */
    int64_t order_log[MAXH];
    int n_order;
    int fail_finished;     /* finished() fails */
    int fail_wait;         /* wait() fails */
} fake;

static int fake_finished(void *ctx, int64_t h, mlu_error *err)
{
    fake *f = (fake *)ctx;
    if (f->fail_finished) {
        mlu_error_set(err, MLU_EIO, -1, "fake event query failed");
        return -1;
    }
    return f->done[h];
}

static mlu_status fake_wait(void *ctx, int64_t h, mlu_error *err)
{
    fake *f = (fake *)ctx;
    if (f->fail_wait)
        return mlu_error_set(err, MLU_EIO, -1, "fake event wait failed");
    f->ordered[h] = 1;
    f->order_log[f->n_order++] = h;
    return MLU_OK;
}

static fake g;

static void test_basics(void)
{
    mlu_offload_window w;
    mlu_error err;

    memset(&g, 0, sizeof(g));
    mlu_error_clear(&err);
    mlu_offload_window_init(&w, 100);
    /* under the limit: nobody waits */
    CHECK(mlu_offload_window_push(&w, 0, 40, &err) == MLU_OK);
    CHECK(mlu_offload_window_settle(&w, fake_finished, fake_wait, &g, &err) == MLU_OK);
    CHECK(mlu_offload_window_push(&w, 1, 60, &err) == MLU_OK);
    CHECK(mlu_offload_window_settle(&w, fake_finished, fake_wait, &g, &err) == MLU_OK);
    CHECK(g.n_order == 0 && w.bytes == 100 && w.len == 2);
    /* 130 > 100: the oldest (0) is waited for, then 90 <= 100 */
    CHECK(mlu_offload_window_push(&w, 2, 30, &err) == MLU_OK);
    CHECK(mlu_offload_window_settle(&w, fake_finished, fake_wait, &g, &err) == MLU_OK);
    CHECK(g.n_order == 1 && g.order_log[0] == 0 && w.bytes == 90 && w.len == 2 && w.waits == 1);
    /* finished copies leave without a wait, from the front only */
    g.done[2] = 1;  /* not at the front: stays */
    CHECK(mlu_offload_window_settle(&w, fake_finished, fake_wait, &g, &err) == MLU_OK);
    CHECK(w.len == 2 && w.bytes == 90);
    g.done[1] = 1;
    CHECK(mlu_offload_window_settle(&w, fake_finished, fake_wait, &g, &err) == MLU_OK);
    CHECK(w.len == 0 && w.bytes == 0 && g.n_order == 1);
    /* one copy larger than the limit: never waited on alone */
    CHECK(mlu_offload_window_push(&w, 3, 500, &err) == MLU_OK);
    CHECK(mlu_offload_window_settle(&w, fake_finished, fake_wait, &g, &err) == MLU_OK);
    CHECK(g.n_order == 1 && w.len == 1);
    /* the next one pushes the big one out (oldest first) */
    CHECK(mlu_offload_window_push(&w, 4, 10, &err) == MLU_OK);
    CHECK(mlu_offload_window_settle(&w, fake_finished, fake_wait, &g, &err) == MLU_OK);
    CHECK(g.n_order == 2 && g.order_log[1] == 3 && w.len == 1 && w.bytes == 10);
    mlu_offload_window_free(&w);
}

static void test_errors(void)
{
    mlu_offload_window w;
    mlu_error err;
    int i;

    memset(&g, 0, sizeof(g));
    mlu_offload_window_init(&w, 10);
    mlu_error_clear(&err);
    CHECK(mlu_offload_window_push(&w, 0, 8, &err) == MLU_OK);
    CHECK(mlu_offload_window_push(&w, 1, 8, &err) == MLU_OK);
    g.fail_finished = 1;
    CHECK(mlu_offload_window_settle(&w, fake_finished, fake_wait, &g, &err) == MLU_EIO);
    CHECK(strstr(err.text, "event query") != NULL && w.len == 2);
    g.fail_finished = 0;
    g.fail_wait = 1;
    mlu_error_clear(&err);
    CHECK(mlu_offload_window_settle(&w, fake_finished, fake_wait, &g, &err) == MLU_EIO);
    CHECK(strstr(err.text, "event wait") != NULL && w.len == 2);  /* nothing dropped on failure */
    mlu_offload_window_free(&w);

    /* the ring grows while wrapped around: order and contents kept */
    memset(&g, 0, sizeof(g));
    mlu_offload_window_init(&w, SIZE_MAX);
    mlu_error_clear(&err);
    for (i = 0; i < 20; i++)
        CHECK(mlu_offload_window_push(&w, i, (size_t)i + 1, &err) == MLU_OK);
    for (i = 0; i < 15; i++)
        g.done[i] = 1;
    CHECK(mlu_offload_window_settle(&w, fake_finished, fake_wait, &g, &err) == MLU_OK);
    CHECK(w.len == 5 && w.head > 0);
    for (i = 20; i < 200; i++)  /* wraps, then grows several times */
        CHECK(mlu_offload_window_push(&w, i, (size_t)i + 1, &err) == MLU_OK);
    for (i = 0; i < (int)w.len; i++)
        CHECK(w.ring[(w.head + (size_t)i) % w.cap].handle == 15 + i);
    mlu_offload_window_free(&w);

    /* growing the ring fails cleanly and keeps what it had */
    mlu_offload_window_init(&w, SIZE_MAX);
    mlu_error_clear(&err);
    for (i = 0; i < 32; i++)
        CHECK(mlu_offload_window_push(&w, i, 1, &err) == MLU_OK);
    mlu_alloc_fail_after(0);
    CHECK(mlu_offload_window_push(&w, 32, 1, &err) == MLU_ENOMEM);
    mlu_alloc_fail_after(-1);
    CHECK(w.len == 32 && w.bytes == 32);
    mlu_error_clear(&err);
    CHECK(mlu_offload_window_push(&w, 32, 1, &err) == MLU_OK && w.len == 33);
    /* byte counts saturate instead of wrapping */
    CHECK(mlu_offload_window_push(&w, 33, SIZE_MAX, &err) == MLU_OK && w.bytes == SIZE_MAX);
    mlu_offload_window_free(&w);
}

static uint64_t rng_state = 88172645463325252ULL;
static uint64_t rnd(void)
{
    return mlu_test_rand(&rng_state);
}

static void test_random(void)
{
    mlu_offload_window w;
    mlu_error err;
    size_t limit = 1000, sizes[MAXH];
    int64_t h;
    int last_ordered = -1;

    memset(&g, 0, sizeof(g));
    mlu_error_clear(&err);
    mlu_offload_window_init(&w, limit);
    for (h = 0; h < MAXH; h++) {
        size_t i, sum = 0;
        int64_t k;
        sizes[h] = (size_t)(rnd() % 400) + 1;
        /* some earlier copies finish, in order (one copy stream) */
        for (k = 0; k < h; k++)
            if (!g.done[k]) {
                if (rnd() % 3 == 0)
                    g.done[k] = 1;
                break;
            }
        CHECK(mlu_offload_window_push(&w, h, sizes[h], &err) == MLU_OK);
        CHECK(mlu_offload_window_settle(&w, fake_finished, fake_wait, &g, &err) == MLU_OK);
        /* the bound: what is left is within the limit, or is the newest alone */
        for (i = 0; i < w.len; i++)
            sum += w.ring[(w.head + i) % w.cap].nbytes;
        CHECK(sum == w.bytes);
        CHECK(w.bytes <= limit || w.len == 1);
        /* the newest is never waited on; waits go oldest first */
        CHECK(!g.ordered[h]);
        while (last_ordered + 1 < g.n_order) {
            last_ordered++;
            if (last_ordered > 0)
                CHECK(g.order_log[last_ordered] > g.order_log[last_ordered - 1]);
        }
    }
    CHECK(g.n_order > 0 && (uint64_t)g.n_order == w.waits);
    mlu_offload_window_free(&w);
}

int main(void)
{
    test_basics();
    test_errors();
    test_random();
    return TEST_DONE("test_offload_window");
}
