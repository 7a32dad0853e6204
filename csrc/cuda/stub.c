/* stub.c: the CUDA ABI for builds without nvcc: every call says so. */
#include "mlu_cuda.h"
#include "mlu_cuda_pattern.h"

#include <string.h>

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

/* The activation-offload engine (offload.cu). */
#include "mlu_cuda_offload.h"

#define MLU_NO_CUDA(err) mlu_error_set((err), MLU_ENOTSUP, -1, "mlutils was built without CUDA: the CUDA offload engine is not available")

mlu_status mlu_cuda_offload_new(int device, size_t cap, mlu_cuda_offload **out, mlu_error *err)
{
    (void)device;
    (void)cap;
    (void)out;
    return MLU_NO_CUDA(err);
}

void mlu_cuda_offload_destroy(mlu_cuda_offload *eng)
{
    (void)eng;
}

mlu_status mlu_cuda_offload_streams(mlu_cuda_offload *eng, void **d2h, void **h2d, mlu_error *err)
{
    (void)eng;
    *d2h = *h2d = NULL;
    return MLU_NO_CUDA(err);
}

mlu_status mlu_cuda_offload_save(mlu_cuda_offload *eng, const void *src, size_t nbytes, int mode,
                                 void *scratch, void *stream, int64_t *handle, mlu_error *err)
{
    (void)eng, (void)src, (void)nbytes, (void)mode, (void)scratch, (void)stream, (void)handle;
    return MLU_NO_CUDA(err);
}

mlu_status mlu_cuda_offload_load(mlu_cuda_offload *eng, int64_t handle, void *dst, size_t nbytes,
                                 void *scratch, void *stream, mlu_error *err)
{
    (void)eng, (void)handle, (void)dst, (void)nbytes, (void)scratch, (void)stream;
    return MLU_NO_CUDA(err);
}

mlu_status mlu_cuda_offload_wait(mlu_cuda_offload *eng, int64_t handle, void *stream, mlu_error *err)
{
    (void)eng, (void)handle, (void)stream;
    return MLU_NO_CUDA(err);
}

mlu_status mlu_cuda_offload_sync(mlu_cuda_offload *eng, int64_t handle, mlu_error *err)
{
    (void)eng, (void)handle;
    return MLU_NO_CUDA(err);
}

mlu_status mlu_cuda_offload_release(mlu_cuda_offload *eng, int64_t handle, mlu_error *err)
{
    (void)eng, (void)handle;
    return MLU_NO_CUDA(err);
}

mlu_status mlu_cuda_offload_stats(mlu_cuda_offload *eng, mlu_pool_stats *out, int64_t *handles,
                                  mlu_error *err)
{
    (void)eng;
    memset(out, 0, sizeof(*out));
    *handles = 0;
    return MLU_NO_CUDA(err);
}

mlu_status mlu_cuda_offload_trim(mlu_cuda_offload *eng, uint64_t *freed, mlu_error *err)
{
    (void)eng;
    *freed = 0;
    return MLU_NO_CUDA(err);
}
