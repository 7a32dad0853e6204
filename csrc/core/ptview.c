/* ptview.c: the rules of a .pt tensor (see ptview.h). */
#include "ptview.h"
#include "torch_dtypes.h"

mlu_status mlu_pt_view_check(const mlu_pt_view *v, const char *key, size_t key_len, uint64_t nbytes,
                             uint64_t *end_bytes, mlu_error *err)
{
    mlu_status st = MLU_EINVAL;
    uint64_t last = 0, end = 0, tmp, isz;
    int64_t numel = 1;
    size_t i;
    int empty = 0;

    *end_bytes = 0;
    if (v->dtype < 0 || v->dtype >= MLU_TORCH_N_DTYPES) {
        mlu_error_set(err, MLU_EINVAL, -1, "dtype index %d out of range", v->dtype);
        goto done;
    }
    isz = mlu_torch_dtypes[v->dtype].itemsize;
    if (v->offset < 0) {
        mlu_error_set(err, MLU_EINVAL, -1, MLU_PT_RULE_OFFSET);
        goto done;
    }
    if (v->ndim > MLU_PT_MAX_NDIM) {
        mlu_error_set(err, MLU_EINVAL, -1, MLU_PT_RULE_SHAPE);
        goto done;
    }
    for (i = 0; i < v->ndim; i++) {
        if (v->shape[i] < 0 || v->stride[i] < 0) {
            mlu_error_set(err, MLU_EINVAL, -1, MLU_PT_RULE_SHAPE);
            goto done;
        }
    }
    for (i = 0; i < v->ndim; i++) {
        if (v->shape[i] == 0)
            empty = 1;
        if (!empty && mlu_mul_overflow_i64(numel, v->shape[i], &numel)) {
            mlu_error_set(err, MLU_EINVAL, -1, "its shape has more than 2**63 elements (torch: numel overflow)");
            goto done;
        }
    }
    if (v->requires_grad && !mlu_torch_dtype_can_require_grad(v->dtype)) {
        mlu_error_set(err, MLU_EINVAL, -1,
                      "the view of storage '%.*s' requires grad but is %s (torch: only floating point and "
                      "complex tensors can require gradients)",
                      (int)key_len, key, mlu_torch_dtypes[v->dtype].name);
        goto done;
    }
    if ((v->flags & MLU_PT_FLAG_CONJ) && !mlu_torch_dtype_is_complex(v->dtype)) {
        mlu_error_set(err, MLU_EINVAL, -1,
                      "the view of storage '%.*s' has the conj flag (a conjugate view) but is %s (torch: only "
                      "complex tensors can be conjugate views)",
                      (int)key_len, key, mlu_torch_dtypes[v->dtype].name);
        goto done;
    }
    if ((v->flags & MLU_PT_FLAG_NEG) && !mlu_torch_dtype_can_negate(v->dtype)) {
        mlu_error_set(err, MLU_EINVAL, -1,
                      "the view of storage '%.*s' has the neg flag (a negative view) but is %s (torch cannot "
                      "negate %s)",
                      (int)key_len, key, mlu_torch_dtypes[v->dtype].name, mlu_torch_dtypes[v->dtype].name);
        goto done;
    }
    if (!empty) {  /* torch loads an empty view with any offset */
        for (i = 0; i < v->ndim; i++) {
            if (mlu_mul_overflow_u64((uint64_t)(v->shape[i] - 1), (uint64_t)v->stride[i], &tmp) ||
                mlu_add_overflow_u64(last, tmp, &last)) {
                mlu_error_set(err, MLU_EINVAL, -1, "its view extent overflows");
                goto done;
            }
        }
        if (mlu_add_overflow_u64(last, (uint64_t)v->offset, &last) || mlu_add_overflow_u64(last, 1, &end) ||
            mlu_mul_overflow_u64(end, isz, &end)) {
            mlu_error_set(err, MLU_EINVAL, -1, "its view extent overflows");
            goto done;
        }
        if (end > nbytes) {
            mlu_error_set(err, MLU_EINVAL, -1,
                          "its view is out of bounds: it needs %llu bytes of storage '%.*s' which holds %llu",
                          (unsigned long long)end, (int)key_len, key, (unsigned long long)nbytes);
            goto done;
        }
    }
    *end_bytes = end;
    st = MLU_OK;
done:
    return st;
}
