/* nccl_comm.h: an NCCL communicator over the run-time loaded library.
 *
 * The same ABI in every build: nccl_comm.c when the extension carries CUDA,
 * stub.c (every call answers MLU_ENOTSUP, "built without CUDA") when not.
 * Buffers are device addresses and streams cudaStream_t, both as void*.
 * With a timeout the communicator is non-blocking: each call is polled
 * through ncclCommGetAsyncError and aborted when the time is up, which the
 * call reports as MLU_ETIMEDOUT. */
#ifndef MLU_NCCL_COMM_H
#define MLU_NCCL_COMM_H

#include "nccl_loader.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct mlu_nccl_comm mlu_nccl_comm;

/* Joins the communicator `id` as `rank` of `nranks` (blocks until every rank
 * joined, or until timeout_s when > 0).  `lib` is borrowed and must outlive
 * the communicator.  *out is NULL on failure. */
mlu_status mlu_nccl_comm_init(const mlu_nccl_lib *lib, int nranks, const mlu_nccl_unique_id *id,
                              int rank, double timeout_s, mlu_nccl_comm **out, mlu_error *err);
int mlu_nccl_comm_rank(const mlu_nccl_comm *c);
int mlu_nccl_comm_size(const mlu_nccl_comm *c);
/* 1 once aborted (explicitly or by a timeout) or destroyed. */
int mlu_nccl_comm_closed(const mlu_nccl_comm *c);
/* 1 when the last failure was a timeout. */
int mlu_nccl_comm_timed_out(const mlu_nccl_comm *c);

mlu_status mlu_nccl_comm_all_reduce(mlu_nccl_comm *c, const void *send, void *recv, size_t count,
                                    int dtype, int op, void *stream, mlu_error *err);
mlu_status mlu_nccl_comm_broadcast(mlu_nccl_comm *c, const void *send, void *recv, size_t count,
                                   int dtype, int root, void *stream, mlu_error *err);
mlu_status mlu_nccl_comm_all_gather(mlu_nccl_comm *c, const void *send, void *recv,
                                    size_t sendcount, int dtype, void *stream, mlu_error *err);
mlu_status mlu_nccl_comm_reduce_scatter(mlu_nccl_comm *c, const void *send, void *recv,
                                        size_t recvcount, int dtype, int op, void *stream,
                                        mlu_error *err);
mlu_status mlu_nccl_comm_send(mlu_nccl_comm *c, const void *buf, size_t count, int dtype,
                              int peer, void *stream, mlu_error *err);
mlu_status mlu_nccl_comm_recv(mlu_nccl_comm *c, void *buf, size_t count, int dtype, int peer,
                              void *stream, mlu_error *err);
mlu_status mlu_nccl_comm_group_start(mlu_nccl_comm *c, mlu_error *err);
mlu_status mlu_nccl_comm_group_end(mlu_nccl_comm *c, mlu_error *err);
/* ncclCommGetAsyncError's result code (0: none, 7: in progress). */
mlu_status mlu_nccl_comm_async_error(mlu_nccl_comm *c, int *result, mlu_error *err);
/* Aborts (ncclCommAbort); safe to call again.  The struct stays until free. */
mlu_status mlu_nccl_comm_abort(mlu_nccl_comm *c, mlu_error *err);
/* Destroys the NCCL communicator (after an abort: nothing left to do). */
mlu_status mlu_nccl_comm_destroy(mlu_nccl_comm *c, mlu_error *err);
/* Frees the struct; destroys the communicator first when still open. */
void mlu_nccl_comm_free(mlu_nccl_comm *c);

#ifdef __cplusplus
}
#endif
#endif
