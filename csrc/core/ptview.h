/* ptview.h: the rules a tensor of a .pt file follows, in one place.
 *
 * The reader (pickle_read.c) refuses a tensor that breaks one, and the
 * writer (ptwrite.c) refuses to write one, with the same words: the reader
 * puts where it found the tensor before them ("tensor at byte N: "), the
 * writer's caller where the tensor was in the object saved after them. */
#ifndef MLU_PTVIEW_H
#define MLU_PTVIEW_H

#include "../mlu.h"

/* The most dimensions a tensor may have. */
#define MLU_PT_MAX_NDIM 64
#define MLU_PT_STR_(x) #x
#define MLU_PT_STR(x) MLU_PT_STR_(x)

/* The words of the rules checked where the tensor is rebuilt (the reader
 * checks them on the pickle's values, before it knows the storage). */
#define MLU_PT_RULE_OFFSET "storage offset is not an int >= 0"
#define MLU_PT_RULE_SHAPE \
    "size and stride must be tuples of equal length (<= " MLU_PT_STR(MLU_PT_MAX_NDIM) ") of ints >= 0"

/* torch's conjugate and negative bits, the keys 'conj' and 'neg' of the
 * metadata dict a tensor's rebuild takes last (torch's _set_tensor_metadata
 * sets a bit for its key, whatever the value): the tensor's values are its
 * view's elements conjugated / negated. */
#define MLU_PT_FLAG_CONJ 1u
#define MLU_PT_FLAG_NEG 2u

/* A tensor as torch describes it (sizes in elements). */
typedef struct mlu_pt_view {
    int dtype;              /* index in mlu_torch_dtypes */
    size_t ndim;
    const int64_t *shape;   /* borrowed, ndim entries */
    const int64_t *stride;  /* borrowed, ndim entries */
    int64_t offset;
    int requires_grad;
    unsigned flags;         /* MLU_PT_FLAG_* */
} mlu_pt_view;

/* Checks v against its storage `key` (key_len bytes) of `nbytes`, in this
 * order: MLU_PT_RULE_OFFSET, MLU_PT_RULE_SHAPE, its element count fits
 * int64 (torch: "numel: integer multiplication overflow"), only floating
 * point and complex tensors require grad, the conj flag only on a complex
 * dtype (torch refuses it elsewhere) and the neg flag only on one torch can
 * negate (elsewhere torch could load the tensor but never give its values),
 * and a non-empty view lies inside the storage (an empty view may have any
 * offset and a stride-0 view any size, as torch loads both).  On success
 * *end_bytes is one past the last byte the view touches (0 when it is
 * empty); on failure err holds the rule's words, MLU_EINVAL. */
mlu_status mlu_pt_view_check(const mlu_pt_view *v, const char *key, size_t key_len, uint64_t nbytes,
                             uint64_t *end_bytes, mlu_error *err);

#endif
