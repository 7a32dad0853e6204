/* alloc.h: every allocation of the C core goes through these, so a test can
 * make the Nth one fail (see mlu_alloc_fail_after). */
#ifndef MLU_ALLOC_H
#define MLU_ALLOC_H

#include <stddef.h>

void *mlu_malloc(size_t size);
void *mlu_calloc(size_t count, size_t size);
void *mlu_realloc(void *ptr, size_t size);
void mlu_free(void *ptr);

/* Testing hook: the (n+1)th allocation from now on fails (and every one after
 * it, until reset); n < 0 turns failure injection off.  Not thread-safe by
 * design: it is for single-threaded tests only. */
void mlu_alloc_fail_after(long n);
/* How many allocations have been attempted since the last fail_after call. */
long mlu_alloc_count(void);

#endif
