/* alloc.c: the one allocator hook of the core. */
#include "alloc.h"

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

void mlu_alloc_fail_after(long n)
{
    fail_after = n;
    attempts = 0;
}

long mlu_alloc_count(void)
{
    return attempts;
}
