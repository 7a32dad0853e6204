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

/* The NCCL communicator (nccl_comm.h): the library may load, but without
 * CUDA code there is nothing to communicate from. */
#include "nccl_comm.h"

#define MLU_NO_CUDA(err) mlu_error_set((err), MLU_ENOTSUP, -1, "mlutils was built without CUDA")

mlu_status mlu_nccl_comm_init(const mlu_nccl_lib *lib, int nranks, const mlu_nccl_unique_id *id,
                              int rank, double timeout_s, mlu_nccl_comm **out, mlu_error *err)
{
    (void)lib;
    (void)nranks;
    (void)id;
    (void)rank;
    (void)timeout_s;
    *out = NULL;
    return MLU_NO_CUDA(err);
}

int mlu_nccl_comm_rank(const mlu_nccl_comm *c)
{
    (void)c;
    return -1;
}

int mlu_nccl_comm_size(const mlu_nccl_comm *c)
{
    (void)c;
    return 0;
}

int mlu_nccl_comm_closed(const mlu_nccl_comm *c)
{
    (void)c;
    return 1;
}

int mlu_nccl_comm_timed_out(const mlu_nccl_comm *c)
{
    (void)c;
    return 0;
}

mlu_status mlu_nccl_comm_all_reduce(mlu_nccl_comm *c, const void *send, void *recv, size_t count,
                                    int dtype, int op, void *stream, mlu_error *err)
{
    (void)c, (void)send, (void)recv, (void)count, (void)dtype, (void)op, (void)stream;
    return MLU_NO_CUDA(err);
}

mlu_status mlu_nccl_comm_broadcast(mlu_nccl_comm *c, const void *send, void *recv, size_t count,
                                   int dtype, int root, void *stream, mlu_error *err)
{
    (void)c, (void)send, (void)recv, (void)count, (void)dtype, (void)root, (void)stream;
    return MLU_NO_CUDA(err);
}

mlu_status mlu_nccl_comm_all_gather(mlu_nccl_comm *c, const void *send, void *recv,
                                    size_t sendcount, int dtype, void *stream, mlu_error *err)
{
    (void)c, (void)send, (void)recv, (void)sendcount, (void)dtype, (void)stream;
    return MLU_NO_CUDA(err);
}

mlu_status mlu_nccl_comm_reduce_scatter(mlu_nccl_comm *c, const void *send, void *recv,
                                        size_t recvcount, int dtype, int op, void *stream,
                                        mlu_error *err)
{
    (void)c, (void)send, (void)recv, (void)recvcount, (void)dtype, (void)op, (void)stream;
    return MLU_NO_CUDA(err);
}

mlu_status mlu_nccl_comm_send(mlu_nccl_comm *c, const void *buf, size_t count, int dtype,
                              int peer, void *stream, mlu_error *err)
{
    (void)c, (void)buf, (void)count, (void)dtype, (void)peer, (void)stream;
    return MLU_NO_CUDA(err);
}

mlu_status mlu_nccl_comm_recv(mlu_nccl_comm *c, void *buf, size_t count, int dtype, int peer,
                              void *stream, mlu_error *err)
{
    (void)c, (void)buf, (void)count, (void)dtype, (void)peer, (void)stream;
    return MLU_NO_CUDA(err);
}

mlu_status mlu_nccl_comm_group_start(mlu_nccl_comm *c, mlu_error *err)
{
    (void)c;
    return MLU_NO_CUDA(err);
}

mlu_status mlu_nccl_comm_group_end(mlu_nccl_comm *c, mlu_error *err)
{
    (void)c;
    return MLU_NO_CUDA(err);
}

mlu_status mlu_nccl_comm_async_error(mlu_nccl_comm *c, int *result, mlu_error *err)
{
    (void)c;
    *result = 0;
    return MLU_NO_CUDA(err);
}

mlu_status mlu_nccl_comm_abort(mlu_nccl_comm *c, mlu_error *err)
{
    (void)c;
    (void)err;
    return MLU_OK;
}

mlu_status mlu_nccl_comm_destroy(mlu_nccl_comm *c, mlu_error *err)
{
    (void)c;
    (void)err;
    return MLU_OK;
}

void mlu_nccl_comm_free(mlu_nccl_comm *c)
{
    (void)c;
}

/* The activation-offload engine (offload.cu). */
#include "mlu_cuda_offload.h"

#define MLU_NO_CUDA_OFFLOAD(err) mlu_error_set((err), MLU_ENOTSUP, -1, "mlutils was built without CUDA: the CUDA offload engine is not available")

mlu_status mlu_cuda_offload_new(int device, size_t cap, mlu_cuda_offload **out, mlu_error *err)
{
    (void)device;
    (void)cap;
    (void)out;
    return MLU_NO_CUDA_OFFLOAD(err);
}

void mlu_cuda_offload_destroy(mlu_cuda_offload *eng)
{
    (void)eng;
}

mlu_status mlu_cuda_offload_streams(mlu_cuda_offload *eng, void **d2h, void **h2d, mlu_error *err)
{
    (void)eng;
    *d2h = *h2d = NULL;
    return MLU_NO_CUDA_OFFLOAD(err);
}

mlu_status mlu_cuda_offload_save(mlu_cuda_offload *eng, const void *src, size_t nbytes, int mode,
                                 void *scratch, void *stream, int64_t *handle, mlu_error *err)
{
    (void)eng, (void)src, (void)nbytes, (void)mode, (void)scratch, (void)stream, (void)handle;
    return MLU_NO_CUDA_OFFLOAD(err);
}

mlu_status mlu_cuda_offload_load(mlu_cuda_offload *eng, int64_t handle, void *dst, size_t nbytes,
                                 void *scratch, void *stream, mlu_error *err)
{
    (void)eng, (void)handle, (void)dst, (void)nbytes, (void)scratch, (void)stream;
    return MLU_NO_CUDA_OFFLOAD(err);
}

mlu_status mlu_cuda_offload_wait(mlu_cuda_offload *eng, int64_t handle, void *stream, mlu_error *err)
{
    (void)eng, (void)handle, (void)stream;
    return MLU_NO_CUDA_OFFLOAD(err);
}

mlu_status mlu_cuda_offload_sync(mlu_cuda_offload *eng, int64_t handle, mlu_error *err)
{
    (void)eng, (void)handle;
    return MLU_NO_CUDA_OFFLOAD(err);
}

mlu_status mlu_cuda_offload_release(mlu_cuda_offload *eng, int64_t handle, mlu_error *err)
{
    (void)eng, (void)handle;
    return MLU_NO_CUDA_OFFLOAD(err);
}

mlu_status mlu_cuda_offload_stats(mlu_cuda_offload *eng, mlu_pool_stats *out, int64_t *handles,
                                  mlu_error *err)
{
    (void)eng;
    memset(out, 0, sizeof(*out));
    *handles = 0;
    return MLU_NO_CUDA_OFFLOAD(err);
}

mlu_status mlu_cuda_offload_window(mlu_cuda_offload *eng, const size_t *limit, size_t *cur_limit,
                                   uint64_t *waits, mlu_error *err)
{
    (void)eng, (void)limit;
    *cur_limit = 0;
    *waits = 0;
    return MLU_NO_CUDA_OFFLOAD(err);
}

mlu_status mlu_cuda_offload_trim(mlu_cuda_offload *eng, uint64_t *freed, mlu_error *err)
{
    (void)eng;
    *freed = 0;
    return MLU_NO_CUDA_OFFLOAD(err);
}
