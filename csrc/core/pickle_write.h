/* pickle_write.h: emits pickle protocol 2 with exactly the opcodes PyTorch's
 * weights-only unpickler accepts (and that Python's pickler itself uses for
 * the same objects), so the bytes can match torch.save's data.pkl.
 *
 * The caller decides what to memoize; mlu_pkw_put hands out memo indexes in
 * order from 0, as Python's pickler does. */
#ifndef MLU_PICKLE_WRITE_H
#define MLU_PICKLE_WRITE_H

#include "../mlu.h"
#include "buf.h"
#include "pickle_ops.h"

/* Items per MARK ... SETITEMS / APPENDS batch (Python's _BATCHSIZE). */
#define MLU_PK_BATCH 1000

typedef struct mlu_pkw {
    mlu_buf buf;          /* owned: the pickle so far */
    uint32_t memo_next;   /* the next memo index */
} mlu_pkw;

void mlu_pkw_init(mlu_pkw *w);
void mlu_pkw_free(mlu_pkw *w);
/* PROTO 2. */
mlu_status mlu_pkw_proto(mlu_pkw *w, mlu_error *err);
/* One argument-less opcode (MLU_PKOP_*, pickle_ops.h). */
mlu_status mlu_pkw_op(mlu_pkw *w, int op, mlu_error *err);
/* BININT1 / BININT2 / BININT / LONG1, as Python picks them. */
mlu_status mlu_pkw_int(mlu_pkw *w, int64_t v, mlu_error *err);
/* LONG1 from n little-endian two's-complement bytes (n <= 255; already minimal). */
mlu_status mlu_pkw_long_bytes(mlu_pkw *w, const unsigned char *le, size_t n, mlu_error *err);
/* BINFLOAT (big-endian IEEE double). */
mlu_status mlu_pkw_float(mlu_pkw *w, double v, mlu_error *err);
mlu_status mlu_pkw_bool(mlu_pkw *w, int v, mlu_error *err);
/* BINUNICODE of n bytes of UTF-8 (the caller encodes). */
mlu_status mlu_pkw_unicode(mlu_pkw *w, const char *s, size_t n, mlu_error *err);
/* GLOBAL "module\nname\n"; neither may contain a newline. */
mlu_status mlu_pkw_global(mlu_pkw *w, const char *module, const char *name, mlu_error *err);
/* BINPUT / LONG_BINPUT of the next memo index, stored in *index when not NULL. */
mlu_status mlu_pkw_put(mlu_pkw *w, uint32_t *index, mlu_error *err);
/* BINGET / LONG_BINGET. */
mlu_status mlu_pkw_get(mlu_pkw *w, uint32_t index, mlu_error *err);

#endif
