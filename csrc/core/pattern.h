/* pattern.h: codebook interleaving patterns (layouts and index tables).
 *
 * A pattern is a layout: for each sequence step s, the list of (t, q)
 * coordinates it carries (t a timestep of the original [K, T] sequence, q a
 * codebook).  It is stored as a compressed row table: the coordinates of
 * step s are t[i], q[i] for i in [step_start[s], step_start[s + 1]).
 *
 * The providers generate their layouts in O(steps + coordinates); the index
 * tables follow the public reference's definitions exactly (see
 * mlutils/pattern.py for the contracts). */
#ifndef MLU_PATTERN_H
#define MLU_PATTERN_H

#include "../mlu.h"

/* The most coordinates (or steps) one pattern may hold; timesteps and
 * codebooks are stored as int32. */
#define MLU_PATTERN_MAX_ENTRIES (((int64_t)1 << 31) - 1)

typedef struct mlu_pattern {
    int64_t n_q;
    int64_t timesteps;
    int64_t n_steps;      /* len(layout) */
    int64_t n_coords;
    int64_t *step_start;  /* owned: [n_steps + 1] */
    int32_t *t;           /* owned: [n_coords] timesteps (every one fits int32) */
    int32_t *q;           /* owned: [n_coords] codebooks */
    size_t cap_steps;     /* allocated entries of step_start (builder) */
    size_t cap_coords;    /* allocated entries of t and q (builder) */
    /* set by mlu_pattern_finish */
    int64_t max_delay;    /* max(t + 1 over layout[1:], 0) - timesteps */
    int64_t valid_steps;  /* len(layout[:n_steps - max_delay]) */
} mlu_pattern;

/* An empty pattern (no steps yet) for n_q codebooks and `timesteps`. */
void mlu_pattern_init(mlu_pattern *p, int64_t n_q, int64_t timesteps);
void mlu_pattern_free(mlu_pattern *p);

/* Builder: open a new (empty) step; add a coordinate to the last step (t
 * and q outside int32 are refused: no valid pattern holds them). */
mlu_status mlu_pattern_add_step(mlu_pattern *p, mlu_error *err);
mlu_status mlu_pattern_add_coord(mlu_pattern *p, int64_t t, int64_t q, mlu_error *err);

/* Checks the layout as the reference does (at least one step, each q in
 * [0, n_q), timesteps never going back for a codebook, at most one
 * coordinate per codebook in a step) and computes max_delay/valid_steps. */
mlu_status mlu_pattern_finish(mlu_pattern *p, mlu_error *err);

/* Provider arguments (MLU_EINVAL with the reason when invalid). */
mlu_status mlu_pattern_check_delayed(int64_t n_q, const int64_t *delays, int64_t n_delays,
                                     mlu_error *err);
mlu_status mlu_pattern_check_unrolled(int64_t n_q, const int64_t *flattening, int64_t n_flat,
                                      const int64_t *delays, int64_t n_delays, mlu_error *err);
mlu_status mlu_pattern_check_coarse_first(int64_t n_q, const int64_t *delays, int64_t n_delays,
                                          mlu_error *err);

/* Providers: each fills an initialised, empty p and finishes it. */
mlu_status mlu_pattern_delayed(mlu_pattern *p, const int64_t *delays, int64_t flatten_first,
                               int64_t empty_initial, mlu_error *err);
mlu_status mlu_pattern_unrolled(mlu_pattern *p, const int64_t *flattening, const int64_t *delays,
                                mlu_error *err);
mlu_status mlu_pattern_coarse_first(mlu_pattern *p, const int64_t *delays, mlu_error *err);
mlu_status mlu_pattern_musiclm(mlu_pattern *p, int64_t group_by, mlu_error *err);

/* Number of steps of the layout used for index tables: valid_steps when
 * `valid`, else n_steps. */
int64_t mlu_pattern_ref_steps(const mlu_pattern *p, int valid);

/* The build tables for an input of n_q == k codebooks and t_in <= timesteps
 * timesteps: indexes[k * L] (row-major [K, L], L = ref_steps) and mask[k * L]. */
mlu_status mlu_pattern_build_indexes(const mlu_pattern *p, int64_t t_in, int64_t k, int valid,
                                     int64_t *indexes, uint8_t *mask, mlu_error *err);

/* The revert tables for a sequence of s_in <= ref_steps steps:
 * indexes[k * timesteps] and mask[k * timesteps].  model_output drops the
 * leading special step when the layout starts with one. */
mlu_status mlu_pattern_revert_indexes(const mlu_pattern *p, int64_t s_in, int64_t k, int valid,
                                      int model_output, int64_t *indexes, uint8_t *mask,
                                      mlu_error *err);

/* Coordinates with timestep t (and codebook q when q >= 0), in layout
 * order: fills steps[] / coords[] (coordinate indices) up to cap entries and
 * returns the total count. */
int64_t mlu_pattern_find(const mlu_pattern *p, int64_t t, int64_t q, int64_t *steps,
                         int64_t *coords, int64_t cap);

/* Runs of a flat index table: consecutive source indexes become one copy,
 * indexes >= n_in one fill of the special value.  runs[2 * r] is the source
 * start (-1 for the special value), runs[2 * r + 1] the length.  Returns the
 * number of runs; writes at most cap of them (call with cap 0 to count). */
int64_t mlu_pattern_runs(const int64_t *indexes, int64_t n, int64_t n_in, int64_t *runs,
                         int64_t cap);

/* dst[o, j] = src[o, indexes[j]] (or the special value) for o < outer,
 * following the runs of the table of n_out entries; elements are elsize
 * bytes (1..16), special holds one element. */
void mlu_pattern_gather(const void *src, int64_t outer, int64_t n_in, size_t elsize,
                        const int64_t *runs, int64_t n_runs, int64_t n_out,
                        const void *special, void *dst);

#endif
