/* pattern.c: codebook interleaving layouts, their checks and index tables. */
#include "pattern.h"
#include "alloc.h"

#include <string.h>

/* Bound on every provider argument, so that sums and products of a few of
 * them never overflow int64. */
#define ARG_LIMIT ((int64_t)1 << 40)

void mlu_pattern_init(mlu_pattern *p, int64_t n_q, int64_t timesteps)
{
    memset(p, 0, sizeof(*p));
    p->n_q = n_q;
    p->timesteps = timesteps;
}

void mlu_pattern_free(mlu_pattern *p)
{
    mlu_free(p->step_start);
    mlu_free(p->t);
    mlu_free(p->q);
    p->step_start = NULL;
    p->t = p->q = NULL;
    p->n_steps = p->n_coords = p->cap_steps = p->cap_coords = 0;
}

static mlu_status too_large(mlu_error *err)
{
    return mlu_error_set(err, MLU_EINVAL, -1,
                         "pattern too large: more than %lld steps or coordinates",
                         (long long)MLU_PATTERN_MAX_ENTRIES);
}

/* Grows *arr (of *cap entries of elsize bytes) to hold at least need entries. */
static mlu_status grow(void **arr, size_t *cap, int64_t need, size_t elsize, mlu_error *err)
{
    if (need > MLU_PATTERN_MAX_ENTRIES)
        return too_large(err);
    return mlu_grow(arr, cap, need > 0 ? (size_t)need : 0, elsize, (size_t)MLU_PATTERN_MAX_ENTRIES + 1,
                    "a pattern table", err);
}

mlu_status mlu_pattern_add_step(mlu_pattern *p, mlu_error *err)
{
    mlu_status st;

    /* step_start holds n_steps + 1 entries */
    st = grow((void **)&p->step_start, &p->cap_steps, p->n_steps + 2, sizeof(int64_t), err);
    if (st != MLU_OK)
        return st;
    if (p->n_steps == 0)
        p->step_start[0] = 0;
    p->n_steps++;
    p->step_start[p->n_steps] = p->n_coords;
    return MLU_OK;
}

mlu_status mlu_pattern_add_coord(mlu_pattern *p, int64_t t, int64_t q, mlu_error *err)
{
    mlu_status st;
    size_t cap_t = p->cap_coords, cap_q = p->cap_coords;

    if (p->n_steps == 0)
        return mlu_error_set(err, MLU_EINVAL, -1, "a coordinate outside of any step");
    if (q < 0 || q > INT32_MAX || q >= p->n_q)
        return mlu_error_set(err, MLU_EINVAL, -1,
                             "codebook %lld at step %lld is outside [0, n_q=%lld)",
                             (long long)q, (long long)(p->n_steps - 1), (long long)p->n_q);
    if (t < INT32_MIN || t > INT32_MAX)
        return mlu_error_set(err, MLU_EINVAL, -1, "timestep %lld at step %lld is out of range",
                             (long long)t, (long long)(p->n_steps - 1));
    if ((size_t)p->n_coords + 1 > p->cap_coords) {
        st = grow((void **)&p->t, &cap_t, p->n_coords + 1, sizeof(int32_t), err);
        if (st != MLU_OK)
            return st;
        st = grow((void **)&p->q, &cap_q, p->n_coords + 1, sizeof(int32_t), err);
        if (st != MLU_OK)
            return st;
        p->cap_coords = cap_t < cap_q ? cap_t : cap_q;
    }
    p->t[p->n_coords] = (int32_t)t;
    p->q[p->n_coords] = (int32_t)q;
    p->n_coords++;
    p->step_start[p->n_steps] = p->n_coords;
    return MLU_OK;
}

/* a * b, or more than the entry limit when it does not fit (a, b >= 0). */
static int64_t mul_cap(int64_t a, int64_t b)
{
    int64_t r;

    if (a < 0 || b < 0)
        return 0;
    if (mlu_mul_overflow_i64(a, b, &r) || r > MLU_PATTERN_MAX_ENTRIES)
        return MLU_PATTERN_MAX_ENTRIES + 1;
    return r;
}

/* Makes room for `steps` more steps and `coords` more coordinates at once,
 * so that the providers append without growing. */
static mlu_status reserve(mlu_pattern *p, int64_t steps, int64_t coords, mlu_error *err)
{
    mlu_status st;
    size_t cap_t = p->cap_coords, cap_q = p->cap_coords;

    if (steps < 0 || coords < 0 || steps > MLU_PATTERN_MAX_ENTRIES - p->n_steps - 1 ||
        coords > MLU_PATTERN_MAX_ENTRIES - p->n_coords)
        return too_large(err);
    st = grow((void **)&p->step_start, &p->cap_steps, p->n_steps + steps + 1, sizeof(int64_t), err);
    if (st == MLU_OK && coords > 0)
        st = grow((void **)&p->t, &cap_t, p->n_coords + coords, sizeof(int32_t), err);
    if (st == MLU_OK && coords > 0)
        st = grow((void **)&p->q, &cap_q, p->n_coords + coords, sizeof(int32_t), err);
    if (st == MLU_OK) {
        p->cap_coords = cap_t < cap_q ? cap_t : cap_q;
        if (p->n_steps == 0)
            p->step_start[0] = 0;
    }
    return st;
}

/* Fails unless `steps` more steps and `coords` more coordinates fit. */
static mlu_status check_room(const mlu_pattern *p, int64_t steps, int64_t coords, mlu_error *err)
{
    if (steps < 0 || coords < 0 || steps > MLU_PATTERN_MAX_ENTRIES - p->n_steps ||
        coords > MLU_PATTERN_MAX_ENTRIES - p->n_coords)
        return too_large(err);
    return MLU_OK;
}

/* len(layout[:n_steps - max_delay]) with Python's slice rules. */
static int64_t valid_steps(int64_t n_steps, int64_t max_delay)
{
    int64_t vs = n_steps - max_delay;

    if (vs < 0)
        vs += n_steps;
    if (vs < 0)
        vs = 0;
    if (vs > n_steps)
        vs = n_steps;
    return vs;
}

mlu_status mlu_pattern_finish(mlu_pattern *p, mlu_error *err)
{
    mlu_status st = MLU_EINVAL;
    int64_t *last = NULL, *seen = NULL;
    int64_t s, i, maxt = 0;

    if (p->n_steps <= 0) {
        st = mlu_error_set(err, MLU_EINVAL, -1, "the pattern layout is empty (it needs at least one step)");
        goto done;
    }
    if (p->n_q <= 0 || p->n_q > MLU_PATTERN_MAX_ENTRIES) {
        st = mlu_error_set(err, MLU_EINVAL, -1, "n_q must be in [1, %lld], got %lld",
                           (long long)MLU_PATTERN_MAX_ENTRIES, (long long)p->n_q);
        goto done;
    }
    if (p->n_coords > 0) {
        last = mlu_calloc((size_t)p->n_q, sizeof(int64_t));
        seen = mlu_calloc((size_t)p->n_q, sizeof(int64_t));
        if (last == NULL || seen == NULL) {
            st = mlu_error_set(err, MLU_ENOMEM, -1, "out of memory checking a pattern");
            goto done;
        }
    }
    for (s = 0; s < p->n_steps; s++) {
        int dup = 0;
        for (i = p->step_start[s]; i < p->step_start[s + 1]; i++) {
            int64_t q = p->q[i], t = p->t[i];
            /* (add_coord refuses q outside [0, n_q) already; kept for safety) */
            if (q < 0 || q >= p->n_q) {
                st = mlu_error_set(err, MLU_EINVAL, -1,
                                   "codebook %lld at step %lld is outside [0, n_q=%lld)",
                                   (long long)q, (long long)s, (long long)p->n_q);
                goto done;
            }
            if (seen[q] == s + 1)
                dup = 1;
            seen[q] = s + 1;
            if (t < last[q]) {
                st = mlu_error_set(err, MLU_EINVAL, -1,
                                   "Past timesteps are found in the sequence for codebook = %lld at step %lld",
                                   (long long)q, (long long)s);
                goto done;
            }
            last[q] = t;
            if (s >= 1 && t + 1 > maxt)
                maxt = t + 1;
        }
        if (dup) {
            st = mlu_error_set(err, MLU_EINVAL, -1,
                               "Multiple entries for a same codebook are found at step %lld",
                               (long long)s);
            goto done;
        }
    }
    p->max_delay = maxt - p->timesteps;
    p->valid_steps = valid_steps(p->n_steps, p->max_delay);
    st = MLU_OK;
done:
    mlu_free(last);
    mlu_free(seen);
    return st;
}

/* ------------------------------------------------------------ provider args */

static mlu_status check_list(const char *what, const int64_t *v, int64_t n, int64_t want,
                             mlu_error *err)
{
    int64_t i;

    if (n != want)
        return mlu_error_set(err, MLU_EINVAL, -1, "%s has %lld entries, expected %lld",
                             what, (long long)n, (long long)want);
    for (i = 0; i < n; i++) {
        if (v[i] < -ARG_LIMIT || v[i] > ARG_LIMIT)
            return mlu_error_set(err, MLU_EINVAL, -1, "%s[%lld] = %lld is out of range",
                                 what, (long long)i, (long long)v[i]);
        if (i > 0 && v[i] < v[i - 1])
            return mlu_error_set(err, MLU_EINVAL, -1,
                                 "%s must be sorted in ascending order (%s[%lld] = %lld < %lld)",
                                 what, what, (long long)i, (long long)v[i], (long long)v[i - 1]);
    }
    return MLU_OK;
}

static mlu_status check_n_q(int64_t n_q, mlu_error *err)
{
    if (n_q <= 0 || n_q > ARG_LIMIT)
        return mlu_error_set(err, MLU_EINVAL, -1, "n_q must be a positive number of codebooks, got %lld",
                             (long long)n_q);
    return MLU_OK;
}

/* check_n_q, then check_list of `what` (v[0..n), want entries). */
static mlu_status check_n_q_list(int64_t n_q, const char *what, const int64_t *v, int64_t n, int64_t want,
                                 mlu_error *err)
{
    mlu_status st = check_n_q(n_q, err);

    if (st == MLU_OK)
        st = check_list(what, v, n, want, err);
    return st;
}

mlu_status mlu_pattern_check_delayed(int64_t n_q, const int64_t *delays, int64_t n_delays,
                                     mlu_error *err)
{
    return check_n_q_list(n_q, "delays", delays, n_delays, n_q, err);
}

mlu_status mlu_pattern_check_unrolled(int64_t n_q, const int64_t *flattening, int64_t n_flat,
                                      const int64_t *delays, int64_t n_delays, mlu_error *err)
{
    mlu_status st = check_n_q_list(n_q, "flattening", flattening, n_flat, n_q, err);
    int64_t i;

    if (st == MLU_OK)
        st = check_list("delays", delays, n_delays, n_q, err);
    if (st != MLU_OK)
        return st;
    /* sorted flattening: codebooks of one inner step are contiguous */
    for (i = 1; i < n_q; i++)
        if (flattening[i] == flattening[i - 1] && delays[i] != delays[i - 1])
            return mlu_error_set(err, MLU_EINVAL, -1,
                                 "Delay and flattening between codebooks is inconsistent: two codebooks "
                                 "flattened to the same position should have the same delay "
                                 "(codebooks %lld and %lld at inner step %lld have delays %lld and %lld)",
                                 (long long)(i - 1), (long long)i, (long long)flattening[i],
                                 (long long)delays[i - 1], (long long)delays[i]);
    return MLU_OK;
}

mlu_status mlu_pattern_check_coarse_first(int64_t n_q, const int64_t *delays, int64_t n_delays,
                                          mlu_error *err)
{
    return check_n_q_list(n_q, "delays", delays, n_delays, n_q - 1, err);
}

static mlu_status check_timesteps(const mlu_pattern *p, mlu_error *err)
{
    if (p->timesteps < 0 || p->timesteps > ARG_LIMIT)
        return mlu_error_set(err, MLU_EINVAL, -1, "timesteps must be in [0, %lld], got %lld",
                             (long long)ARG_LIMIT, (long long)p->timesteps);
    return MLU_OK;
}

/* ---------------------------------------------------------------- providers */
/* Appends after reserve(): no capacity checks. */
static inline void put_step(mlu_pattern *p)
{
    p->n_steps++;
    p->step_start[p->n_steps] = p->n_coords;
}

static inline void put_coord(mlu_pattern *p, int64_t t, int64_t q)
{
    p->t[p->n_coords] = (int32_t)t;
    p->q[p->n_coords] = (int32_t)q;
    p->n_coords++;
    p->step_start[p->n_steps] = p->n_coords;
}

/* mlu_pattern_finish for layouts valid by construction (codebooks in
 * [0, n_q), timesteps >= 0 and rising per codebook, one entry per codebook
 * and step): only computes max_delay and valid_steps.  Tests compare it
 * with the full check. */
static mlu_status finish_trusted(mlu_pattern *p, mlu_error *err)
{
    int64_t i, maxt = 0;

    if (p->n_steps <= 0)
        return mlu_pattern_finish(p, err);
    for (i = p->step_start[1]; i < p->n_coords; i++)
        if ((int64_t)p->t[i] + 1 > maxt)
            maxt = (int64_t)p->t[i] + 1;
    p->max_delay = maxt - p->timesteps;
    p->valid_steps = valid_steps(p->n_steps, p->max_delay);
    return MLU_OK;
}


mlu_status mlu_pattern_delayed(mlu_pattern *p, const int64_t *delays, int64_t flatten_first,
                               int64_t empty_initial, mlu_error *err)
{
    mlu_status st;
    int64_t K = p->n_q, T = p->timesteps, t, q, n, maxd, end, ff = flatten_first;

    st = mlu_pattern_check_delayed(K, delays, K, err);
    if (st == MLU_OK)
        st = check_timesteps(p, err);
    if (st != MLU_OK)
        return st;
    if (ff < -ARG_LIMIT || ff > ARG_LIMIT || empty_initial < -ARG_LIMIT || empty_initial > ARG_LIMIT)
        return mlu_error_set(err, MLU_EINVAL, -1, "flatten_first or empty_initial is out of range");
    {
        int64_t lim = ff > 0 ? (T < ff ? T : ff) : 0, tail = T + delays[K - 1] - ff;
        int64_t flat_n = mul_cap(lim, K), tail_n = tail > 0 ? tail : 0;
        st = reserve(p, (empty_initial >= 0) + (empty_initial > 0 ? empty_initial : 0) + flat_n + tail_n,
                     flat_n + mul_cap(tail_n, K), err);
        if (st != MLU_OK)
            return st;
    }
    /* empty_initial < 0: no leading special step */
    if (empty_initial >= 0)
        put_step(p);
    for (n = 0; n < empty_initial; n++)
        put_step(p);
    if (ff > 0) {
        int64_t lim = T < ff ? T : ff;
        for (t = 0; t < lim; t++)
            for (q = 0; q < K; q++) {
                put_step(p);
                put_coord(p, t, q);
            }
    }
    maxd = delays[K - 1];
    end = T + maxd;
    for (t = ff; t < end; t++) {
        if (t == ff && (ff < INT32_MIN || end - 1 - delays[0] > INT32_MAX)) {
            p->n_steps = p->n_coords = 0;
            return too_large(err);
        }
        put_step(p);
        for (q = 0; q < K; q++)
            if (t - delays[q] >= ff)
                put_coord(p, t - delays[q], q);
    }
    /* flatten_first >= 0 keeps every codebook's timesteps >= 0 and rising */
    return ff >= 0 ? finish_trusted(p, err) : mlu_pattern_finish(p, err);
}

typedef struct unrolled_group {
    int64_t q0, count, delay;
} unrolled_group;

typedef struct key_span {
    int64_t lo, hi; /* [lo, hi) */
} key_span;

mlu_status mlu_pattern_unrolled(mlu_pattern *p, const int64_t *flattening, const int64_t *delays,
                                mlu_error *err)
{
    mlu_status st;
    int64_t K = p->n_q, T = p->timesteps, n_inner, maxT, E = 0, G = 0, i, j, k, e;
    unrolled_group *groups = NULL;
    int64_t *order = NULL;
    key_span *spans = NULL;
    int64_t n_spans = 0;
    uint64_t total;

    st = mlu_pattern_check_unrolled(K, flattening, K, delays, K, err);
    if (st == MLU_OK)
        st = check_timesteps(p, err);
    if (st != MLU_OK)
        goto done;
    groups = mlu_calloc((size_t)K, sizeof(*groups));
    order = mlu_calloc((size_t)K, sizeof(*order));
    spans = mlu_calloc((size_t)K + 2, sizeof(*spans));
    if (groups == NULL || order == NULL || spans == NULL) {
        st = mlu_error_set(err, MLU_ENOMEM, -1, "out of memory building an unrolled pattern");
        goto done;
    }
    n_inner = flattening[K - 1] + 1;
    maxT = T + delays[K - 1];
    /* the inner steps [0, n_inner) that carry codebooks, in order */
    for (i = 0; i < K; i++) {
        if (flattening[i] < 0)
            continue;
        if (G > 0 && flattening[i] == flattening[i - 1]) {
            groups[G - 1].count++;
            continue;
        }
        groups[G].q0 = i;
        groups[G].count = 1;
        groups[G].delay = delays[i];
        G++;
    }
    if (n_inner > 0)
        E = n_inner - G;
    if (maxT <= 0) {
        G = 0;
        E = 0;
        maxT = 0;
    }
    /* size: 1 + maxT * (E + G) steps, maxT * K coordinates at most */
    if (mlu_mul_overflow_u64((uint64_t)maxT, (uint64_t)(E + G), &total) ||
        total >= (uint64_t)MLU_PATTERN_MAX_ENTRIES ||
        mlu_mul_overflow_u64((uint64_t)maxT, (uint64_t)K, &total) ||
        total >= (uint64_t)MLU_PATTERN_MAX_ENTRIES) {
        st = too_large(err);
        goto done;
    }
    st = reserve(p, 1 + mul_cap(maxT, E + G), mul_cap(maxT, K), err);
    if (st != MLU_OK)
        goto done;
    /* Entries are sorted by (key, coordinates): at one key, the empty inner
     * steps first, then the groups by their timestep t = key - delay
     * ascending (larger delays first), then by codebook. */
    for (i = 0; i < G; i++) {
        int64_t g = i;
        for (j = i; j > 0 && groups[order[j - 1]].delay < groups[g].delay; j--)
            order[j] = order[j - 1];
        order[j] = g;
    }
    /* the keys that hold entries: {-1}, [0, maxT) when E > 0, and
     * [delay, delay + maxT) cut at maxT for each group */
    spans[n_spans].lo = -1;
    spans[n_spans++].hi = 0;
    if (E > 0 && maxT > 0) {
        spans[n_spans].lo = 0;
        spans[n_spans++].hi = maxT;
    }
    for (i = 0; i < G; i++) {
        int64_t lo = groups[i].delay, hi = groups[i].delay + maxT;
        if (hi > maxT)
            hi = maxT;
        if (lo < hi) {
            spans[n_spans].lo = lo;
            spans[n_spans++].hi = hi;
        }
    }
    for (i = 1; i < n_spans; i++) {
        key_span s = spans[i];
        for (j = i; j > 0 && spans[j - 1].lo > s.lo; j--)
            spans[j] = spans[j - 1];
        spans[j] = s;
    }
    k = spans[0].lo;
    for (i = 0; i < n_spans; i++) {
        if (k < spans[i].lo)
            k = spans[i].lo;
        for (; k < spans[i].hi; k++) {
            if (k == -1)
                put_step(p);
            if (k >= 0 && k < maxT)
                for (e = 0; e < E; e++)
                    put_step(p);
            for (j = 0; j < G; j++) {
                const unrolled_group *g = &groups[order[j]];
                int64_t t = k - g->delay, q;
                if (t < 0 || t >= maxT)
                    continue;
                put_step(p);
                for (q = g->q0; q < g->q0 + g->count; q++)
                    put_coord(p, t, q);
            }
        }
    }
    /* each codebook appears once per timestep, ordered by t + its delay */
    st = finish_trusted(p, err);
done:
    mlu_free(groups);
    mlu_free(order);
    mlu_free(spans);
    return st;
}

mlu_status mlu_pattern_coarse_first(mlu_pattern *p, const int64_t *delays, mlu_error *err)
{
    mlu_status st;
    int64_t K = p->n_q, T = p->timesteps, t, q, end;

    st = mlu_pattern_check_coarse_first(K, delays, K - 1, err);
    if (st == MLU_OK)
        st = check_timesteps(p, err);
    if (st != MLU_OK)
        return st;
    if (K < 2)
        return mlu_error_set(err, MLU_EINVAL, -1,
                             "CoarseFirstPattern needs at least 2 codebooks (its delays are empty)");
    end = T + delays[K - 2];
    st = check_room(p, 1 + T + (end > 0 ? end : 0), 0, err);
    if (st == MLU_OK && end > 0 && end > MLU_PATTERN_MAX_ENTRIES / K)
        st = too_large(err);
    if (st == MLU_OK)
        st = reserve(p, 1 + T + (end > 0 ? end : 0), T + mul_cap(end > 0 ? end : 0, K - 1), err);
    if (st == MLU_OK && end > 0 && end - 1 - delays[0] > INT32_MAX)
        st = too_large(err);
    if (st != MLU_OK)
        return st;
    put_step(p);
    for (t = 0; t < T; t++) {
        put_step(p);
        put_coord(p, t, 0);
    }
    for (t = 0; t < end; t++) {
        put_step(p);
        for (q = 0; q < K - 1; q++)
            if (t - delays[q] >= 0)
                put_coord(p, t - delays[q], q + 1);
    }
    return finish_trusted(p, err);
}

mlu_status mlu_pattern_musiclm(mlu_pattern *p, int64_t group_by, mlu_error *err)
{
    mlu_status st;
    int64_t K = p->n_q, T = p->timesteps, off, t, q, n_off;
    uint64_t total;

    st = check_n_q(K, err);
    if (st == MLU_OK)
        st = check_timesteps(p, err);
    if (st != MLU_OK)
        return st;
    if (group_by == 0)
        return mlu_error_set(err, MLU_EINVAL, -1, "group_by must not be zero");
    if (group_by < -ARG_LIMIT || group_by > ARG_LIMIT)
        return mlu_error_set(err, MLU_EINVAL, -1, "group_by is out of range");
    n_off = group_by > 0 ? (K + group_by - 1) / group_by : 0;
    if (mlu_mul_overflow_u64((uint64_t)n_off, (uint64_t)T, &total) ||
        (group_by > 0 && mlu_mul_overflow_u64(total, (uint64_t)group_by, &total)) ||
        total >= (uint64_t)MLU_PATTERN_MAX_ENTRIES)
        return too_large(err);
    st = reserve(p, 1 + (int64_t)total, (int64_t)total, err);
    if (st != MLU_OK)
        return st;
    put_step(p);
    for (off = 0; group_by > 0 && off < K; off += group_by)
        for (t = 0; t < T; t++)
            for (q = off; q < off + group_by; q++) {
                put_step(p);
                put_coord(p, t, q);
            }
    /* a last group that runs past n_q is refused by the full check */
    return (group_by > 0 && K % group_by == 0) ? finish_trusted(p, err) : mlu_pattern_finish(p, err);
}

/* ------------------------------------------------------------- index tables */

int64_t mlu_pattern_ref_steps(const mlu_pattern *p, int valid)
{
    return valid ? p->valid_steps : p->n_steps;
}

mlu_status mlu_pattern_build_indexes(const mlu_pattern *p, int64_t t_in, int64_t k, int valid,
                                     int64_t *indexes, uint8_t *mask, mlu_error *err)
{
    int64_t L = mlu_pattern_ref_steps(p, valid), fill, n, i, s;

    if (k != p->n_q)
        return mlu_error_set(err, MLU_EINVAL, -1,
                             "invalid number of codebooks for the sequence and the pattern: %lld != %lld",
                             (long long)k, (long long)p->n_q);
    if (t_in < 0 || t_in > p->timesteps)
        return mlu_error_set(err, MLU_EINVAL, -1,
                             "invalid number of timesteps used to build the sequence from the pattern: "
                             "%lld > %lld", (long long)t_in, (long long)p->timesteps);
    if (mlu_mul_overflow_i64(k, t_in, &fill) || mlu_mul_overflow_i64(k, L, &n))
        return mlu_error_set(err, MLU_EOVERFLOW, -1, "pattern index table size overflows");
    for (i = 0; i < n; i++)
        indexes[i] = fill;
    memset(mask, 0, (size_t)n);
    for (s = 0; s < L; s++)
        for (i = p->step_start[s]; i < p->step_start[s + 1]; i++)
            if (p->t[i] < t_in) {
                indexes[(int64_t)p->q[i] * L + s] = p->t[i] + (int64_t)p->q[i] * t_in;
                mask[(int64_t)p->q[i] * L + s] = 1;
            }
    return MLU_OK;
}

mlu_status mlu_pattern_revert_indexes(const mlu_pattern *p, int64_t s_in, int64_t k, int valid,
                                      int model_output, int64_t *indexes, uint8_t *mask,
                                      mlu_error *err)
{
    int64_t L = mlu_pattern_ref_steps(p, valid), T = p->timesteps, fill, n, i, s, start = 0;

    if (k != p->n_q)
        return mlu_error_set(err, MLU_EINVAL, -1,
                             "invalid number of codebooks for the sequence and the pattern: %lld != %lld",
                             (long long)k, (long long)p->n_q);
    if (s_in < 0 || s_in > L)
        return mlu_error_set(err, MLU_EINVAL, -1,
                             "sequence to revert is longer than the defined pattern: %lld > %lld",
                             (long long)s_in, (long long)L);
    if (T < 0)
        return mlu_error_set(err, MLU_EINVAL, -1, "cannot revert to a negative number of timesteps (%lld)",
                             (long long)T);
    if (mlu_mul_overflow_i64(k, s_in, &fill) || mlu_mul_overflow_i64(k, T, &n))
        return mlu_error_set(err, MLU_EOVERFLOW, -1, "pattern index table size overflows");
    if (model_output && p->n_steps > 0 && p->step_start[1] == p->step_start[0])
        start = 1;
    for (i = 0; i < n; i++)
        indexes[i] = fill;
    memset(mask, 0, (size_t)n);
    for (s = 0; s < s_in && s + start < L; s++)
        for (i = p->step_start[s + start]; i < p->step_start[s + start + 1]; i++)
            if (p->t[i] < T) {
                indexes[(int64_t)p->q[i] * T + p->t[i]] = s + (int64_t)p->q[i] * s_in;
                mask[(int64_t)p->q[i] * T + p->t[i]] = 1;
            }
    return MLU_OK;
}

int64_t mlu_pattern_find(const mlu_pattern *p, int64_t t, int64_t q, int64_t *steps,
                         int64_t *coords, int64_t cap)
{
    int64_t s, i, n = 0;

    for (s = 0; s < p->n_steps; s++)
        for (i = p->step_start[s]; i < p->step_start[s + 1]; i++)
            if (p->t[i] == t && (q < 0 || p->q[i] == q)) {
                if (n < cap) {
                    steps[n] = s;
                    coords[n] = i;
                }
                n++;
            }
    return n;
}

int64_t mlu_pattern_runs(const int64_t *indexes, int64_t n, int64_t n_in, int64_t *runs,
                         int64_t cap)
{
    int64_t j, r = -1, prev = 0;
    int prev_special = 0;

    for (j = 0; j < n; j++) {
        int special = indexes[j] < 0 || indexes[j] >= n_in;
        if (r >= 0 && special == prev_special && (special || indexes[j] == prev + 1)) {
            if (r < cap)
                runs[2 * r + 1]++;
        } else {
            r++;
            if (r < cap) {
                runs[2 * r] = special ? -1 : indexes[j];
                runs[2 * r + 1] = 1;
            }
        }
        prev = indexes[j];
        prev_special = special;
    }
    return r + 1;
}

#define FILL_LOOP(type)                                               \
    do {                                                              \
        type v_, *d_ = (type *)(void *)d;                             \
        memcpy(&v_, special, sizeof(type));                           \
        for (m = 0; m < len; m++)                                     \
            d_[m] = v_;                                               \
    } while (0)

void mlu_pattern_gather(const void *src, int64_t outer, int64_t n_in, size_t elsize,
                        const int64_t *runs, int64_t n_runs, int64_t n_out,
                        const void *special, void *dst)
{
    int64_t o, r, m;

    for (o = 0; o < outer; o++) {
        const char *srow = (const char *)src + (size_t)o * (size_t)n_in * elsize;
        char *d = (char *)dst + (size_t)o * (size_t)n_out * elsize;
        for (r = 0; r < n_runs; r++) {
            int64_t start = runs[2 * r], len = runs[2 * r + 1];
            if (start >= 0) {
                const char *s = srow + (size_t)start * elsize;
                if (len == 1) {
                    switch (elsize) {
                    case 8: memcpy(d, s, 8); break;
                    case 4: memcpy(d, s, 4); break;
                    case 2: memcpy(d, s, 2); break;
                    case 1: *d = *s; break;
                    default: memcpy(d, s, elsize); break;
                    }
                } else {
                    memcpy(d, s, (size_t)len * elsize);
                }
            } else {
                switch (elsize) {
                case 8: FILL_LOOP(uint64_t); break;
                case 4: FILL_LOOP(uint32_t); break;
                case 2: FILL_LOOP(uint16_t); break;
                case 1: memset(d, *(const unsigned char *)special, (size_t)len); break;
                default:
                    for (m = 0; m < len; m++)
                        memcpy(d + (size_t)m * elsize, special, elsize);
                    break;
                }
            }
            d += (size_t)len * elsize;
        }
    }
}
