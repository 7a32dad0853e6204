/* stub.c: the CUDA ABI for builds without nvcc: every call says so. */
#include "mlu_cuda.h"
#include "mlu_cuda_pattern.h"

int mlu_cuda_built(void)
{
    return 0;
}

mlu_status mlu_cuda_device_count(int *count, mlu_error *err)
{
    *count = 0;
    mlu_error_set(err, MLU_ENOTSUP, -1, "mlutils was built without CUDA");
    return MLU_OK;
}

mlu_status mlu_cuda_checksum64(const void *dptr, size_t n, void *stream,
                               uint64_t *out, mlu_error *err)
{
    (void)dptr;
    (void)n;
    (void)stream;
    *out = 0;
    return mlu_error_set(err, MLU_ENOTSUP, -1, "mlutils was built without CUDA");
}

mlu_status mlu_cuda_pattern_gather(const void *src, int64_t outer, int64_t n_in,
                                   const int64_t *indexes, int64_t n_out, size_t elsize,
                                   const void *special, void *dst, void *stream,
                                   mlu_error *err)
{
    (void)src;
    (void)outer;
    (void)n_in;
    (void)indexes;
    (void)n_out;
    (void)elsize;
    (void)special;
    (void)dst;
    (void)stream;
    return mlu_error_set(err, MLU_ENOTSUP, -1, "mlutils was built without CUDA");
}
