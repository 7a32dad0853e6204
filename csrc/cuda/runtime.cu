// runtime.cu: device discovery and the status conversion shared by the
// launchers.  Linked against the static CUDA runtime, which loads the driver
// only when first used, so importing mlutils works without one.
#include <cuda_runtime.h>

#include "mlu_cuda.h"
#include "mlu_cuda_internal.h"

extern "C" int mlu_cuda_built(void)
{
    return 1;
}

extern "C" mlu_status mlu_cuda_device_count(int *count, mlu_error *err)
{
    int n = 0;
    cudaError_t rc = cudaGetDeviceCount(&n);

    *count = 0;
    if (rc != cudaSuccess) {
        // No driver / no device: not an error for the caller, only a reason.
        mlu_error_set(err, MLU_EDEVICE, -1, "no usable CUDA device: %s",
                      cudaGetErrorString(rc));
        cudaGetLastError();  // clear the sticky-free error state
        return MLU_OK;
    }
    *count = n;
    return MLU_OK;
}

mlu_status mlu_cuda_status(cudaError_t rc, const char *what, mlu_error *err)
{
    if (rc == cudaSuccess)
        return MLU_OK;
    return mlu_error_set(err, MLU_EDEVICE, -1, "%s: %s (%s)", what,
                         cudaGetErrorString(rc), cudaGetErrorName(rc));
}
