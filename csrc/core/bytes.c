/* bytes.c: UTF-8 validation, byte-string order, index sort (see bytes.h). */
#include "bytes.h"

#include <string.h>

/* The length of the valid UTF-8 sequence that starts s[0..avail) (avail > 0),
 * or 0 when none does. */
static size_t utf8_sequence(const uint8_t *s, size_t avail, int surrogates)
{
    uint8_t c = s[0];
    size_t len = 0, k;
    uint32_t cp = 0, least = 0;

    if (c < 0x80) {
        len = 1;
    } else if (c >= 0xC2 && c <= 0xDF) {
        len = 2;
        cp = c & 0x1Fu;
        least = 0x80;
    } else if (c >= 0xE0 && c <= 0xEF) {
        len = 3;
        cp = c & 0x0Fu;
        least = 0x800;
    } else if (c >= 0xF0 && c <= 0xF4) {
        len = 4;
        cp = c & 0x07u;
        least = 0x10000;
    }
    if (len > avail)
        len = 0;
    for (k = 1; k < len; k++) {
        if ((s[k] & 0xC0) != 0x80)
            len = 0;
        cp = (cp << 6) | (s[k] & 0x3Fu);
    }
    if (len > 1 && (cp < least || cp > 0x10FFFF || (!surrogates && cp >= 0xD800 && cp <= 0xDFFF)))
        len = 0;
    return len;
}

size_t mlu_utf8_invalid_at(const uint8_t *s, size_t n, int surrogates)
{
    size_t i = 0, len = 1;

    while (i < n && (len = utf8_sequence(s + i, n - i, surrogates)) > 0)
        i += len;
    return i;
}

int mlu_bytes_cmp(const void *a, size_t an, const void *b, size_t bn)
{
    int c = memcmp(a, b, an < bn ? an : bn);

    if (c == 0)
        c = an < bn ? -1 : an > bn;
    return c;
}

/* Moves v[root] down the max-heap v[0..n) to where it belongs. */
static void sift_down(size_t *v, size_t root, size_t n, mlu_index_cmp cmp, const void *ctx)
{
    for (;;) {
        size_t child = 2 * root + 1, big = root, t;
        if (child < n && cmp(ctx, v[child], v[big]) > 0)
            big = child;
        if (child + 1 < n && cmp(ctx, v[child + 1], v[big]) > 0)
            big = child + 1;
        if (big == root)
            break;
        t = v[root];
        v[root] = v[big];
        v[big] = t;
        root = big;
    }
}

void mlu_sort_indices(size_t *v, size_t n, mlu_index_cmp cmp, const void *ctx)
{
    size_t i, t;

    for (i = n / 2; i-- > 0;)
        sift_down(v, i, n, cmp, ctx);
    for (i = n; i-- > 1;) {
        t = v[0];
        v[0] = v[i];
        v[i] = t;
        sift_down(v, 0, i, cmp, ctx);
    }
}
