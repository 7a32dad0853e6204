// mlu_cuda_internal.h: helpers shared by the .cu files only.
#ifndef MLU_CUDA_INTERNAL_H
#define MLU_CUDA_INTERNAL_H

#include <cuda_runtime.h>

#include "../mlu.h"

// Turns a CUDA result into a status, filling err with `what` and the reason.
mlu_status mlu_cuda_status(cudaError_t rc, const char *what, mlu_error *err);

#endif
