/* mlu_cuda.h: the C ABI between the binding layer and the CUDA code.
 *
 * Every function returns an mlu_status and fills an mlu_error; streams are
 * passed as void* (a cudaStream_t, NULL for the default stream) so that this
 * header needs no CUDA header.  When the extension is built without nvcc,
 * stub.c provides the same functions, each answering MLU_ENOTSUP. */
#ifndef MLU_CUDA_H
#define MLU_CUDA_H

#include "../mlu.h"

#ifdef __cplusplus
extern "C" {
#endif

/* 1 when this build carries CUDA code, else 0. */
int mlu_cuda_built(void);

/* Number of usable devices.  No driver or no device is not an error: *count
 * is 0 and err->text says why (for cuda_available's diagnostics). */
mlu_status mlu_cuda_device_count(int *count, mlu_error *err);

/* The mlu_checksum64 of n bytes at device address dptr, computed on the GPU
 * on `stream`; waits for the result. */
mlu_status mlu_cuda_checksum64(const void *dptr, size_t n, void *stream,
                               uint64_t *out, mlu_error *err);

#ifdef __cplusplus
}
#endif
#endif
