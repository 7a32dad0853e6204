/* error.c: filling the core's error struct. */
#include "../mlu.h"

#include <stdio.h>
#include <string.h>

void mlu_error_clear(mlu_error *err)
{
    if (err == NULL)
        return;
    memset(err, 0, sizeof(*err));
    err->offset = -1;
}

static void set_text(mlu_error *err, const char *fmt, va_list ap)
{
    int n = vsnprintf(err->text, sizeof(err->text), fmt, ap);
    if (n < 0)
        err->text[0] = '\0';
}

mlu_status mlu_error_set(mlu_error *err, mlu_status code, int64_t offset,
                         const char *fmt, ...)
{
    va_list ap;

    /* The first error wins: it is the cause, later ones are consequences. */
    if (err == NULL || err->code != MLU_OK)
        return code;
    err->code = code;
    err->offset = offset;
    va_start(ap, fmt);
    set_text(err, fmt, ap);
    va_end(ap);
    return code;
}

mlu_status mlu_error_errno(mlu_error *err, int sys_errno, const char *fmt, ...)
{
    va_list ap;

    if (err == NULL || err->code != MLU_OK)
        return MLU_EIO;
    err->code = MLU_EIO;
    err->sys_errno = sys_errno;
    err->offset = -1;
    va_start(ap, fmt);
    set_text(err, fmt, ap);
    va_end(ap);
    return MLU_EIO;
}

const char *mlu_status_name(mlu_status code)
{
    static const char *const names[MLU_STATUS_COUNT] = {
        "ok", "out of memory", "invalid argument", "wrong type", "overflow",
        "I/O error", "malformed input", "unsafe input", "not supported",
        "device error", "timed out",
    };
    if ((int)code < 0 || code >= MLU_STATUS_COUNT)
        return "unknown status";
    return names[code];
}
