/* bytes.h: what the format readers do to raw bytes, in one place:
 * little-endian reads of fixed-width integers (zip records, pickle opcodes,
 * the safetensors header length, legacy .pt counts), UTF-8 validation
 * (safetensors headers, pickle strings, .pt records), and ordering names
 * (zip record names, pickle storage keys): one comparison of byte strings
 * and one sort of an index array by it. */
#ifndef MLU_BYTES_H
#define MLU_BYTES_H

#include <stddef.h>
#include <stdint.h>

/* The unsigned little-endian integer in p[0..2), p[0..4) or p[0..8) (p need
 * not be aligned; the caller has checked that the bytes are there). */
static inline uint16_t mlu_le16(const uint8_t *p)
{
    return (uint16_t)(p[0] | (p[1] << 8));
}

static inline uint32_t mlu_le32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static inline uint64_t mlu_le64(const uint8_t *p)
{
    return (uint64_t)mlu_le32(p) | ((uint64_t)mlu_le32(p + 4) << 32);
}

/* The index of the first byte of p[0..n) that does not start a valid UTF-8
 * sequence (shortest form, at most U+10FFFF), or n when all of it is valid.
 * Encoded surrogates (U+D800..U+DFFF) are valid only with `surrogates`
 * (Python's "surrogatepass", as torch decodes pickle BINUNICODE). */
size_t mlu_utf8_invalid_at(const uint8_t *p, size_t n, int surrogates);

/* <0, 0 or >0 as a[0..an) sorts before, equal to or after b[0..bn): bytes
 * compared unsigned, a prefix first (memcmp order, then length). */
int mlu_bytes_cmp(const void *a, size_t an, const void *b, size_t bn);

/* Compares the things indices x and y stand for, as mlu_bytes_cmp does. */
typedef int (*mlu_index_cmp)(const void *ctx, size_t x, size_t y);

/* Sorts the indices v[0..n) so that cmp(ctx, v[i], v[i + 1]) <= 0: a heap
 * sort in place (no allocation, no global state, O(n log n) whatever the
 * input; not stable). */
void mlu_sort_indices(size_t *v, size_t n, mlu_index_cmp cmp, const void *ctx);

#endif
