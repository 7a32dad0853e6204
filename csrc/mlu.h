/* mlu.h: what every part of the mlutils C core shares.
 *
 * Status codes, the error struct the core reports through, and checked
 * arithmetic.  Nothing here (and nothing under core/) includes Python.h:
 * the core is plain C11 so it can be unit-tested, fuzzed and reused. */
#ifndef MLU_H
#define MLU_H

#include <stddef.h>
#include <stdint.h>
#include <stdarg.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum mlu_status {
    MLU_OK = 0,
    MLU_ENOMEM,     /* an allocation failed                          -> MemoryError */
    MLU_EINVAL,     /* a bad argument from the caller                -> ValueError */
    MLU_ETYPE,      /* a value of the wrong kind                     -> TypeError */
    MLU_EOVERFLOW,  /* a size or number does not fit                 -> OverflowError */
    MLU_EIO,        /* the operating system said no (errno kept)     -> OSError */
    MLU_EFORMAT,    /* untrusted bytes are malformed                 -> the area's format error */
    MLU_EUNSAFE,    /* untrusted bytes ask for something forbidden   -> UnsafePickleError */
    MLU_ENOTSUP,    /* not built in / not available on this machine  -> RuntimeError */
    MLU_EDEVICE,    /* an accelerator call failed                    -> RuntimeError */
    MLU_ETIMEDOUT,  /* a wait ran past its deadline                  -> TimeoutError */
    MLU_STATUS_COUNT
} mlu_status;

#define MLU_ERROR_TEXT 320

/* What went wrong, where.  `offset` is a byte offset into the input when it
 * means something (-1 otherwise); line/column are 1-based (0 = unknown). */
typedef struct mlu_error {
    mlu_status code;
    int sys_errno;
    int64_t offset;
    int line;
    int column;
    char text[MLU_ERROR_TEXT];
} mlu_error;

void mlu_error_clear(mlu_error *err);
/* Sets err (when err is not NULL and not already set) and returns code. */
mlu_status mlu_error_set(mlu_error *err, mlu_status code, int64_t offset,
                         const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 4, 5)))
#endif
    ;
/* Like mlu_error_set with code MLU_EIO, keeping errno. */
mlu_status mlu_error_errno(mlu_error *err, int sys_errno, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;
const char *mlu_status_name(mlu_status code);

/* Checked arithmetic: return 1 on overflow (and leave *out unspecified). */
static inline int mlu_add_overflow_u64(uint64_t a, uint64_t b, uint64_t *out)
{
    return __builtin_add_overflow(a, b, out);
}
static inline int mlu_mul_overflow_u64(uint64_t a, uint64_t b, uint64_t *out)
{
    return __builtin_mul_overflow(a, b, out);
}
static inline int mlu_add_overflow_size(size_t a, size_t b, size_t *out)
{
    return __builtin_add_overflow(a, b, out);
}
static inline int mlu_mul_overflow_size(size_t a, size_t b, size_t *out)
{
    return __builtin_mul_overflow(a, b, out);
}
static inline int mlu_add_overflow_i64(int64_t a, int64_t b, int64_t *out)
{
    return __builtin_add_overflow(a, b, out);
}
static inline int mlu_mul_overflow_i64(int64_t a, int64_t b, int64_t *out)
{
    return __builtin_mul_overflow(a, b, out);
}

#ifdef __cplusplus
}
#endif
#endif /* MLU_H */
