// checksum.cu: the GPU twin of mlu_checksum64 (csrc/core/checksum.c), used by
// tests to check device copies byte for byte.
#include <cuda_runtime.h>

#include "mlu_cuda.h"
#include "mlu_cuda_internal.h"

__global__ void mlu_checksum64_kernel(const unsigned char *b, size_t n,
                                      unsigned long long *out)
{
    unsigned long long sum = 0;
    size_t stride = (size_t)blockDim.x * gridDim.x;

    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        sum += (unsigned long long)b[i] * (2ull * i + 1ull);
    // Reduce within the warp, then one atomic per warp (wrap-around
    // addition is associative, so the order does not matter).
    for (int off = 16; off > 0; off /= 2)
        sum += __shfl_down_sync(0xffffffffu, sum, off);
    if ((threadIdx.x & 31) == 0)
        atomicAdd(out, sum);
}

extern "C" mlu_status mlu_cuda_checksum64(const void *dptr, size_t n, void *stream,
                                          uint64_t *out, mlu_error *err)
{
    mlu_status st = MLU_EDEVICE;
    cudaStream_t s = (cudaStream_t)stream;
    unsigned long long *d_out = NULL;
    unsigned long long h_out = 0;
    const int threads = 256;
    size_t blocks;

    *out = 0;
    if (n == 0)
        return MLU_OK;
    if (dptr == NULL)
        return mlu_error_set(err, MLU_EINVAL, -1, "checksum of a NULL device pointer");
    blocks = (n + threads - 1) / threads;
    if (blocks > 4096)
        blocks = 4096;
    st = mlu_cuda_status(cudaMallocAsync((void **)&d_out, sizeof(*d_out), s), "cudaMallocAsync", err);
    if (st != MLU_OK)
        goto done;
    st = mlu_cuda_status(cudaMemsetAsync(d_out, 0, sizeof(*d_out), s), "cudaMemsetAsync", err);
    if (st != MLU_OK)
        goto done;
    mlu_checksum64_kernel<<<(unsigned)blocks, threads, 0, s>>>((const unsigned char *)dptr, n, d_out);
    st = mlu_cuda_status(cudaGetLastError(), "checksum kernel launch", err);
    if (st != MLU_OK)
        goto done;
    st = mlu_cuda_status(cudaMemcpyAsync(&h_out, d_out, sizeof(h_out), cudaMemcpyDeviceToHost, s),
                         "cudaMemcpyAsync", err);
    if (st != MLU_OK)
        goto done;
    st = mlu_cuda_status(cudaStreamSynchronize(s), "cudaStreamSynchronize", err);
    if (st != MLU_OK)
        goto done;
    *out = (uint64_t)h_out;
done:
    if (d_out != NULL) {
        mlu_status st2 = mlu_cuda_status(cudaFreeAsync(d_out, s), "cudaFreeAsync", err);
        if (st == MLU_OK)
            st = st2;
    }
    return st;
}
