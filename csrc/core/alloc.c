/* alloc.c: the one allocator hook of the core, and array growth. */
#include "alloc.h"

#include <stdint.h>
#include <stdlib.h>

static long fail_after = -1;  /* < 0: never fail */
static long attempts = 0;

static int should_fail(void)
{
    attempts++;
    if (fail_after < 0)
        return 0;
    return attempts > fail_after;
}

void *mlu_malloc(size_t size)
{
    if (should_fail())
        return NULL;
    return malloc(size ? size : 1);
}

void *mlu_calloc(size_t count, size_t size)
{
    if (should_fail())
        return NULL;
    if (count == 0 || size == 0)
        count = size = 1;
    return calloc(count, size);
}

void *mlu_realloc(void *ptr, size_t size)
{
    if (should_fail())
        return NULL;
    return realloc(ptr, size ? size : 1);
}

void mlu_free(void *ptr)
{
    free(ptr);
}

mlu_status mlu_grow(void **arr, size_t *cap, size_t need, size_t elsize, size_t max,
                    const char *what, mlu_error *err)
{
    mlu_status st = MLU_OK;
    size_t limit, c, bytes;
    void *p;

    if (need <= *cap)
        goto done;
    if (elsize == 0) {
        st = mlu_error_set(err, MLU_EINVAL, -1, "%s: entries of 0 bytes cannot grow", what);
        goto done;
    }
    limit = SIZE_MAX / elsize;
    if (max < limit)
        limit = max;
    if (need > limit) {
        st = mlu_error_set(err, MLU_EOVERFLOW, -1, "%s: %zu entries of %zu bytes are more than the %zu it can hold",
                           what, need, elsize, limit);
        goto done;
    }
    c = MLU_GROW_MIN_BYTES / elsize > MLU_GROW_MIN ? MLU_GROW_MIN_BYTES / elsize : MLU_GROW_MIN;
    if (c < *cap)
        c = *cap;
    while (c < need)
        c = c > limit / 2 ? limit : c * 2;
    if (c > limit)
        c = limit;
    if (mlu_mul_overflow_size(c, elsize, &bytes)) {  /* cannot happen: c <= SIZE_MAX / elsize */
        st = mlu_error_set(err, MLU_EOVERFLOW, -1, "%s: %zu entries of %zu bytes overflow", what, c, elsize);
        goto done;
    }
    p = mlu_realloc(*arr, bytes);
    if (p == NULL) {
        st = mlu_error_set(err, MLU_ENOMEM, -1, "out of memory growing %s to %zu entries (%zu bytes)",
                           what, c, bytes);
        goto done;
    }
    *arr = p;
    *cap = c;
done:
    return st;
}

void mlu_alloc_fail_after(long n)
{
    fail_after = n;
    attempts = 0;
}

long mlu_alloc_count(void)
{
    return attempts;
}
