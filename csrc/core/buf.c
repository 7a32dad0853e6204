/* buf.c: growable byte buffer. */
#include "buf.h"
#include "alloc.h"

#include <string.h>

mlu_status mlu_buf_reserve(mlu_buf *b, size_t extra, mlu_error *err)
{
    size_t need;

    if (mlu_add_overflow_size(b->len, extra, &need))
        return mlu_error_set(err, MLU_EOVERFLOW, -1, "buffer size overflows");
    return mlu_grow((void **)&b->data, &b->cap, need, 1, SIZE_MAX, "a buffer", err);
}

mlu_status mlu_buf_append(mlu_buf *b, const void *p, size_t n, mlu_error *err)
{
    mlu_status st;

    if (n == 0)
        return MLU_OK;
    st = mlu_buf_reserve(b, n, err);
    if (st != MLU_OK)
        return st;
    memcpy(b->data + b->len, p, n);
    b->len += n;
    return MLU_OK;
}

mlu_status mlu_buf_putc(mlu_buf *b, char c, mlu_error *err)
{
    if (b->len == b->cap) {
        mlu_status st = mlu_buf_reserve(b, 1, err);
        if (st != MLU_OK)
            return st;
    }
    b->data[b->len++] = c;
    return MLU_OK;
}

mlu_status mlu_buf_puts(mlu_buf *b, const char *s, mlu_error *err)
{
    return mlu_buf_append(b, s, strlen(s), err);
}

void mlu_buf_free(mlu_buf *b)
{
    mlu_free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}
