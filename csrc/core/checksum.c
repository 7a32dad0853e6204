/* checksum.c: CPU reference of the position-weighted checksum. */
#include "checksum.h"

uint64_t mlu_checksum64(const void *data, size_t n)
{
    const unsigned char *b = data;
    uint64_t sum = 0;
    size_t i;

    for (i = 0; i < n; i++)
        sum += (uint64_t)b[i] * (2 * (uint64_t)i + 1);
    return sum;
}
