/* mlu_cuda_pattern.h: the C ABI of the pattern gather on the GPU.
 *
 * Same conventions as mlu_cuda.h: status returns, an mlu_error, streams as
 * void* (a cudaStream_t; NULL for the legacy default stream).  Builds
 * without nvcc get an MLU_ENOTSUP stub from stub.c. */
#ifndef MLU_CUDA_PATTERN_H
#define MLU_CUDA_PATTERN_H

#include "../mlu.h"

#ifdef __cplusplus
extern "C" {
#endif

/* dst[o, j] = indexes[j] < n_in ? src[o, indexes[j]] : special, for
 * o < outer and j < n_out; all three pointers are device memory (src
 * [outer, n_in], dst [outer, n_out], indexes int64 [n_out]); elements are
 * elsize bytes (1, 2, 4, 8 or 16), `special` one element in host memory.
 * Queued on `stream`; does not wait for it. */
mlu_status mlu_cuda_pattern_gather(const void *src, int64_t outer, int64_t n_in,
                                   const int64_t *indexes, int64_t n_out, size_t elsize,
                                   const void *special, void *dst, void *stream,
                                   mlu_error *err);

#ifdef __cplusplus
}
#endif
#endif
