/* buf.h: a growable byte buffer with checked growth. */
#ifndef MLU_BUF_H
#define MLU_BUF_H

#include "../mlu.h"

typedef struct mlu_buf {
    char *data;   /* owned; NULL until the first write */
    size_t len;
    size_t cap;
} mlu_buf;

#define MLU_BUF_INIT {NULL, 0, 0}

/* Make room for `extra` more bytes.  MLU_ENOMEM / MLU_EOVERFLOW on failure. */
mlu_status mlu_buf_reserve(mlu_buf *b, size_t extra, mlu_error *err);
mlu_status mlu_buf_append(mlu_buf *b, const void *p, size_t n, mlu_error *err);
mlu_status mlu_buf_putc(mlu_buf *b, char c, mlu_error *err);
mlu_status mlu_buf_puts(mlu_buf *b, const char *s, mlu_error *err);
void mlu_buf_free(mlu_buf *b);

#endif
