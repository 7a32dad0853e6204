/* pattern_layout.c: fuzz harness for a pattern built from an arbitrary
 * layout (the builder, mlu_pattern_finish's checks) and, when accepted, its
 * index tables, runs and gather.
 *
 * Input: n_q, timesteps (signed bytes), then records of two bytes: 0xFF x
 * opens a step, else (t, q) as signed bytes adds a coordinate.
 *
 * Checks, besides not crashing or leaking: build/revert tables hold either
 * the fill value or an index inside the input; mask marks exactly the
 * indexes inside the input; gathering along the runs of a table gives
 * src[indexes[j]] (or the special value) for every j. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/alloc.h"
#include "core/pattern.h"

/* gather along the runs of table[n] over rows of n_in int32, compared with
 * a direct lookup */
static void check_gather(const int64_t *table, int64_t n, int64_t n_in)
{
    int64_t nruns = mlu_pattern_runs(table, n, n_in, NULL, 0), j, o, total = 0, r;
    int64_t *runs = mlu_malloc((size_t)(nruns > 0 ? nruns : 1) * 2 * sizeof(int64_t));
    int32_t *src = mlu_malloc((size_t)(n_in > 0 ? n_in : 1) * 2 * sizeof(int32_t));
    int32_t *dst = mlu_malloc((size_t)(n > 0 ? n : 1) * 2 * sizeof(int32_t));
    int32_t special = -7;

    if (runs == NULL || src == NULL || dst == NULL)
        goto done;
    if (mlu_pattern_runs(table, n, n_in, runs, nruns) != nruns)
        abort();
    for (r = 0; r < nruns; r++) {
        if (runs[2 * r + 1] < 1 || runs[2 * r] < -1 ||
            (runs[2 * r] >= 0 && runs[2 * r] + runs[2 * r + 1] > n_in))
            abort();
        total += runs[2 * r + 1];
    }
    if (total != n)
        abort();
    for (j = 0; j < 2 * n_in; j++)
        src[j] = (int32_t)(j * 31 + 1);
    mlu_pattern_gather(src, 2, n_in, sizeof(int32_t), runs, nruns, n, &special, dst);
    for (o = 0; o < 2; o++)
        for (j = 0; j < n; j++) {
            int64_t ix = table[j];
            int32_t want = (ix >= 0 && ix < n_in) ? src[o * n_in + ix] : special;
            if (dst[o * n + j] != want)
                abort();
        }
done:
    mlu_free(runs);
    mlu_free(src);
    mlu_free(dst);
}

static void check_table(const int64_t *ix, const uint8_t *mask, int64_t n, int64_t fill)
{
    int64_t i;
    for (i = 0; i < n; i++) {
        if (mask[i] > 1 || (mask[i] == 1) != (ix[i] != fill) || ix[i] < 0 || ix[i] > fill)
            abort();
    }
}

static void check_tables(const mlu_pattern *p)
{
    int valid, model_output;
    int64_t k = p->n_q, T = p->timesteps;
    mlu_error err;

    for (valid = 0; valid < 2; valid++) {
        int64_t L = mlu_pattern_ref_steps(p, valid), t_in, s_in;
        size_t cells = (size_t)(k * (L > T ? L : T));
        int64_t *ix = mlu_malloc((cells ? cells : 1) * sizeof(int64_t));
        uint8_t *mask = mlu_malloc(cells ? cells : 1);
        if (L < 0 || L > p->n_steps)
            abort();
        if (ix == NULL || mask == NULL)
            goto next;
        for (t_in = T; t_in >= 0; t_in = t_in > 1 ? t_in / 2 : t_in - 1) {
            mlu_error_clear(&err);
            if (mlu_pattern_build_indexes(p, t_in, k, valid, ix, mask, &err) != MLU_OK)
                abort();
            check_table(ix, mask, k * L, k * t_in);
            check_gather(ix, k * L, k * t_in);
        }
        for (model_output = 0; model_output < 2; model_output++)
            for (s_in = L; s_in >= 0; s_in = s_in > 1 ? s_in / 2 : s_in - 1) {
                mlu_error_clear(&err);
                if (mlu_pattern_revert_indexes(p, s_in, k, valid, model_output, ix, mask, &err) !=
                    MLU_OK)
                    abort();
                check_table(ix, mask, k * T, k * s_in);
                check_gather(ix, k * T, k * s_in);
            }
        mlu_error_clear(&err);
        if (mlu_pattern_build_indexes(p, T + 1, k, valid, ix, mask, &err) == MLU_OK ||
            mlu_pattern_revert_indexes(p, L + 1, k, valid, 0, ix, mask, &err) == MLU_OK)
            abort();
    next:
        mlu_free(ix);
        mlu_free(mask);
    }
    {
        int64_t steps[4], coords[4], t;
        for (t = -1; t <= T; t++) {
            int64_t all = mlu_pattern_find(p, t, -1, steps, coords, 4), i, m;
            for (i = 0; i < (all < 4 ? all : 4); i++)
                if (p->t[coords[i]] != t || coords[i] < p->step_start[steps[i]] ||
                    coords[i] >= p->step_start[steps[i] + 1])
                    abort();
            m = mlu_pattern_find(p, t, 0, NULL, NULL, 0);
            if (m > all)
                abort();
        }
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    mlu_pattern p;
    mlu_error err;
    size_t i;

    if (size < 2)
        return 0;
    mlu_pattern_init(&p, (int8_t)data[0], (int8_t)data[1]);
    mlu_error_clear(&err);
    for (i = 2; i + 1 < size; i += 2) {
        mlu_status st = data[i] == 0xFF ? mlu_pattern_add_step(&p, &err)
                                        : mlu_pattern_add_coord(&p, (int8_t)data[i], (int8_t)data[i + 1], &err);
        if (st != MLU_OK) {
            if (st != MLU_EINVAL || err.text[0] == '\0')
                abort();
            goto done;
        }
    }
    mlu_error_clear(&err);
    if (mlu_pattern_finish(&p, &err) != MLU_OK) {
        if (err.code != MLU_EINVAL || err.text[0] == '\0')
            abort();
        goto done;
    }
    if (p.n_q < 1 || p.n_steps < 1)
        abort();
    if (p.timesteps >= 0)
        check_tables(&p);
done:
    mlu_pattern_free(&p);
    return 0;
}

#include "pt_replay.h"
