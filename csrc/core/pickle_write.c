/* pickle_write.c: protocol-2 pickle emitter (see pickle_write.h). */
#include "pickle_write.h"

#include <string.h>

void mlu_pkw_init(mlu_pkw *w)
{
    w->buf.data = NULL;
    w->buf.len = 0;
    w->buf.cap = 0;
    w->memo_next = 0;
}

void mlu_pkw_free(mlu_pkw *w)
{
    mlu_buf_free(&w->buf);
    w->memo_next = 0;
}

static mlu_status put_bytes(mlu_pkw *w, const void *p, size_t n, mlu_error *err)
{
    return mlu_buf_append(&w->buf, p, n, err);
}

mlu_status mlu_pkw_proto(mlu_pkw *w, mlu_error *err)
{
    static const unsigned char proto[2] = {MLU_PKOP_PROTO, 2};
    return put_bytes(w, proto, 2, err);
}

mlu_status mlu_pkw_op(mlu_pkw *w, int op, mlu_error *err)
{
    return mlu_buf_putc(&w->buf, (char)(unsigned char)op, err);
}

mlu_status mlu_pkw_long_bytes(mlu_pkw *w, const unsigned char *le, size_t n, mlu_error *err)
{
    unsigned char head[2];
    mlu_status st;

    if (n > 255)
        return mlu_error_set(err, MLU_EOVERFLOW, -1,
                             "integer needs %zu bytes; the weights-only format allows 255", n);
    head[0] = MLU_PKOP_LONG1;
    head[1] = (unsigned char)n;
    st = put_bytes(w, head, 2, err);
    if (st == MLU_OK)
        st = put_bytes(w, le, n, err);
    return st;
}

mlu_status mlu_pkw_int(mlu_pkw *w, int64_t v, mlu_error *err)
{
    unsigned char b[9];
    size_t n, i;
    uint64_t u;

    if (v >= 0 && v <= 0xFF) {
        b[0] = MLU_PKOP_BININT1;
        b[1] = (unsigned char)v;
        return put_bytes(w, b, 2, err);
    }
    if (v >= 0 && v <= 0xFFFF) {
        b[0] = MLU_PKOP_BININT2;
        b[1] = (unsigned char)v;
        b[2] = (unsigned char)(v >> 8);
        return put_bytes(w, b, 3, err);
    }
    if (v >= INT32_MIN && v <= INT32_MAX) {
        u = (uint64_t)v;
        b[0] = MLU_PKOP_BININT;
        for (i = 0; i < 4; i++)
            b[1 + i] = (unsigned char)(u >> (8 * i));
        return put_bytes(w, b, 5, err);
    }
    /* Minimal two's complement, little-endian (pickle's encode_long). */
    u = (uint64_t)v;
    for (i = 0; i < 8; i++)
        b[i] = (unsigned char)(u >> (8 * i));
    n = 8;
    if (v >= 0) {
        while (n > 1 && b[n - 1] == 0x00 && (b[n - 2] & 0x80) == 0)
            n--;
    } else {
        while (n > 1 && b[n - 1] == 0xFF && (b[n - 2] & 0x80) != 0)
            n--;
    }
    return mlu_pkw_long_bytes(w, b, n, err);
}

mlu_status mlu_pkw_float(mlu_pkw *w, double v, mlu_error *err)
{
    unsigned char b[9];
    uint64_t u;
    int i;

    memcpy(&u, &v, 8);
    b[0] = MLU_PKOP_BINFLOAT;
    for (i = 0; i < 8; i++)
        b[1 + i] = (unsigned char)(u >> (56 - 8 * i));
    return put_bytes(w, b, 9, err);
}

mlu_status mlu_pkw_bool(mlu_pkw *w, int v, mlu_error *err)
{
    return mlu_pkw_op(w, v ? MLU_PKOP_NEWTRUE : MLU_PKOP_NEWFALSE, err);
}

mlu_status mlu_pkw_unicode(mlu_pkw *w, const char *s, size_t n, mlu_error *err)
{
    unsigned char head[5];
    mlu_status st;

    if ((uint64_t)n > 0xFFFFFFFFull)
        return mlu_error_set(err, MLU_EOVERFLOW, -1,
                             "string of %zu bytes is too long for pickle protocol 2", n);
    head[0] = MLU_PKOP_BINUNICODE;
    head[1] = (unsigned char)n;
    head[2] = (unsigned char)(n >> 8);
    head[3] = (unsigned char)(n >> 16);
    head[4] = (unsigned char)((uint64_t)n >> 24);
    st = mlu_buf_reserve(&w->buf, 5 + n, err);
    if (st != MLU_OK)
        return st;
    st = put_bytes(w, head, 5, err);
    if (st == MLU_OK)
        st = put_bytes(w, s, n, err);
    return st;
}

mlu_status mlu_pkw_global(mlu_pkw *w, const char *module, const char *name, mlu_error *err)
{
    mlu_status st;

    if (strchr(module, '\n') != NULL || strchr(name, '\n') != NULL)
        return mlu_error_set(err, MLU_EINVAL, -1, "global name with a newline");
    st = mlu_buf_putc(&w->buf, MLU_PKOP_GLOBAL, err);
    if (st == MLU_OK)
        st = mlu_buf_puts(&w->buf, module, err);
    if (st == MLU_OK)
        st = mlu_buf_putc(&w->buf, '\n', err);
    if (st == MLU_OK)
        st = mlu_buf_puts(&w->buf, name, err);
    if (st == MLU_OK)
        st = mlu_buf_putc(&w->buf, '\n', err);
    return st;
}

static mlu_status memo_op(mlu_pkw *w, char short_op, char long_op, uint32_t index, mlu_error *err)
{
    unsigned char b[5];

    if (index < 256) {
        b[0] = (unsigned char)short_op;
        b[1] = (unsigned char)index;
        return put_bytes(w, b, 2, err);
    }
    b[0] = (unsigned char)long_op;
    b[1] = (unsigned char)index;
    b[2] = (unsigned char)(index >> 8);
    b[3] = (unsigned char)(index >> 16);
    b[4] = (unsigned char)(index >> 24);
    return put_bytes(w, b, 5, err);
}

mlu_status mlu_pkw_put(mlu_pkw *w, uint32_t *index, mlu_error *err)
{
    mlu_status st;

    if (w->memo_next == UINT32_MAX)
        return mlu_error_set(err, MLU_EOVERFLOW, -1, "pickle memo is full");
    st = memo_op(w, MLU_PKOP_BINPUT, MLU_PKOP_LONG_BINPUT, w->memo_next, err);
    if (st != MLU_OK)
        return st;
    if (index != NULL)
        *index = w->memo_next;
    w->memo_next++;
    return MLU_OK;
}

mlu_status mlu_pkw_get(mlu_pkw *w, uint32_t index, mlu_error *err)
{
    if (index >= w->memo_next)
        return mlu_error_set(err, MLU_EINVAL, -1, "pickle memo index %u was never put", index);
    return memo_op(w, MLU_PKOP_BINGET, MLU_PKOP_LONG_BINGET, index, err);
}
