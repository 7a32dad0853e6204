// pattern.cu: the GPU gather behind Pattern.build_pattern_sequence and the
// revert methods for CUDA tensors: dst[o, j] = src[o, indexes[j]], or the
// special value where indexes[j] >= n_in (the reference's appended column).
#include <cuda_runtime.h>
#include <string.h>

#include "mlu_cuda_pattern.h"
#include "mlu_cuda_internal.h"

struct alignas(16) mlu_elem16 {
    unsigned long long lo, hi;
};

template <typename E>
__global__ void mlu_pattern_gather_kernel(const E *__restrict__ src, long long outer,
                                          long long n_in, const long long *__restrict__ indexes,
                                          long long n_out, E special, E *__restrict__ dst)
{
    long long total = outer * n_out;
    long long stride = (long long)blockDim.x * gridDim.x;

    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        long long o = i / n_out, j = i - o * n_out;
        long long v = indexes[j];
        dst[i] = (v >= 0 && v < n_in) ? src[o * n_in + v] : special;
    }
}

template <typename E>
static mlu_status launch(const void *src, int64_t outer, int64_t n_in, const int64_t *indexes,
                         int64_t n_out, const void *special, void *dst, cudaStream_t s,
                         mlu_error *err)
{
    E sp;
    const int threads = 256;
    long long total = (long long)outer * (long long)n_out;
    long long blocks = (total + threads - 1) / threads;

    memcpy(&sp, special, sizeof(E));
    if (blocks > 65535LL * 16)
        blocks = 65535LL * 16;
    mlu_pattern_gather_kernel<E><<<(unsigned)blocks, threads, 0, s>>>(
        (const E *)src, (long long)outer, (long long)n_in, (const long long *)indexes,
        (long long)n_out, sp, (E *)dst);
    return mlu_cuda_status(cudaGetLastError(), "pattern gather kernel launch", err);
}

extern "C" mlu_status mlu_cuda_pattern_gather(const void *src, int64_t outer, int64_t n_in,
                                              const int64_t *indexes, int64_t n_out,
                                              size_t elsize, const void *special, void *dst,
                                              void *stream, mlu_error *err)
{
    cudaStream_t s = (cudaStream_t)stream;
    int64_t total;

    if (outer < 0 || n_in < 0 || n_out < 0)
        return mlu_error_set(err, MLU_EINVAL, -1, "negative gather sizes");
    if (__builtin_mul_overflow(outer, n_out, &total))
        return mlu_error_set(err, MLU_EOVERFLOW, -1, "gather size overflows");
    if (total == 0)
        return MLU_OK;
    if (dst == NULL || indexes == NULL || special == NULL || (src == NULL && n_in > 0))
        return mlu_error_set(err, MLU_EINVAL, -1, "gather with a NULL pointer");
    switch (elsize) {
    case 1: return launch<unsigned char>(src, outer, n_in, indexes, n_out, special, dst, s, err);
    case 2: return launch<unsigned short>(src, outer, n_in, indexes, n_out, special, dst, s, err);
    case 4: return launch<unsigned int>(src, outer, n_in, indexes, n_out, special, dst, s, err);
    case 8: return launch<unsigned long long>(src, outer, n_in, indexes, n_out, special, dst, s, err);
    case 16: return launch<mlu_elem16>(src, outer, n_in, indexes, n_out, special, dst, s, err);
    default:
        return mlu_error_set(err, MLU_EINVAL, -1, "unsupported element size %zu", elsize);
    }
}
