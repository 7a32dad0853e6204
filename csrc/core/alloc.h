/* alloc.h: every allocation of the core goes through these, so a test can
 * make the Nth one fail (see mlu_alloc_fail_after); and the one way arrays
 * grow (mlu_grow). */
#ifndef MLU_ALLOC_H
#define MLU_ALLOC_H

#include <stddef.h>

#include "../mlu.h"

void *mlu_malloc(size_t size);
void *mlu_calloc(size_t count, size_t size);
void *mlu_realloc(void *ptr, size_t size);
void mlu_free(void *ptr);

/* The smallest capacity mlu_grow gives: MLU_GROW_MIN entries, and at least
 * MLU_GROW_MIN_BYTES bytes' worth of them. */
#define MLU_GROW_MIN 16
#define MLU_GROW_MIN_BYTES 64

/* Grows *arr, an array of *cap entries of elsize bytes, so that it holds at
 * least `need` entries: the capacity doubles (starting at the minimum above)
 * and never exceeds max entries (SIZE_MAX: no bound but the address space),
 * so every size it allocates is checked.  Does nothing when need <= *cap.
 * `what` names the array in messages ("zip records").  On failure *arr and
 * *cap are unchanged (the old array stays valid and owned by the caller) and
 * err (may be NULL) says why: MLU_EOVERFLOW when need is above max or need
 * entries do not fit in size_t bytes, MLU_ENOMEM when the allocation fails,
 * MLU_EINVAL when elsize is 0. */
mlu_status mlu_grow(void **arr, size_t *cap, size_t need, size_t elsize, size_t max,
                    const char *what, mlu_error *err);

/* Testing hook: the (n+1)th allocation from now on fails (and every one after
 * it, until reset); n < 0 turns failure injection off.  Not thread-safe by
 * design: it is for single-threaded tests only. */
void mlu_alloc_fail_after(long n);
/* How many allocations have been attempted since the last fail_after call. */
long mlu_alloc_count(void);

#endif
