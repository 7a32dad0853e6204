/* mlu_cuda_offload.h: the C ABI of the activation-offload engine (offload.cu).
 *
 * An engine belongs to one device.  It owns a pool of pinned host buffers
 * (csrc/core/offload_pool.h), one device-to-host and one host-to-device copy
 * stream, and a table of handles.  Ordering, with `stream` the caller's:
 *  - save: the copy stream waits for an event recorded on `stream` (so the
 *    copy sees the finished source), then packs (when compressing) and copies;
 *    `stream` itself never waits.  The caller keeps the source (and scratch)
 *    alive for the copy stream (record_stream) until the copy is done.
 *  - load: the copy stream waits for the save's copy and for an event on
 *    `stream` (dst and scratch were just allocated on it), copies, expands.
 *  - wait: `stream` waits for the load (cudaStreamWaitEvent): any kernel
 *    queued on it after this call sees the reloaded data.
 *    The copies not yet known to be done form a window
 *    (csrc/core/offload_window.h): when their bytes pass its limit, save
 *    blocks the calling thread until the oldest ones are done, so the sources
 *    held for copying stay bounded when activations come faster than the
 *    link drains them (the caching allocator reuses memory by what the host
 *    knows to be done, so the host is what must wait).
 *  - release: the pinned buffer goes back to the pool once every copy that
 *    reads or writes it has finished (checked without blocking, later).
 * Every call returns a status; CUDA failures carry cudaGetErrorString's text. */
#ifndef MLU_CUDA_OFFLOAD_H
#define MLU_CUDA_OFFLOAD_H

#include "../mlu.h"
#include "../core/offload_layout.h"
#include "../core/offload_pool.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct mlu_cuda_offload mlu_cuda_offload;

/* The default bound on bytes of sources waiting for their device-to-host copy. */
#define MLU_OFFLOAD_DEFAULT_WINDOW ((size_t)256 << 20)

/* A new engine on `device` with a pinned pool capped at `cap` bytes
 * (SIZE_MAX: none).  *out set on success only. */
mlu_status mlu_cuda_offload_new(int device, size_t cap, mlu_cuda_offload **out, mlu_error *err);
/* Waits for its copies, frees its pinned memory, streams and events (NULL is fine). */
void mlu_cuda_offload_destroy(mlu_cuda_offload *eng);
/* Its copy streams (cudaStream_t), for the caller's record_stream. */
mlu_status mlu_cuda_offload_streams(mlu_cuda_offload *eng, void **d2h, void **h2d, mlu_error *err);
/* Starts the copy of a device tensor to pinned memory; *handle names it.
 * RAW: nbytes at src.  Packed modes: nelem = nbytes / element size, and
 * scratch is device memory of mlu_offload_packed_size(mode, nelem) bytes. */
mlu_status mlu_cuda_offload_save(mlu_cuda_offload *eng, const void *src, size_t nbytes, int mode,
                                 void *scratch, void *stream, int64_t *handle, mlu_error *err);
/* Starts the copy of `handle` back into dst (nbytes, as saved); scratch as for save. */
mlu_status mlu_cuda_offload_load(mlu_cuda_offload *eng, int64_t handle, void *dst, size_t nbytes,
                                 void *scratch, void *stream, mlu_error *err);
/* Makes `stream` wait for the load of `handle`. */
mlu_status mlu_cuda_offload_wait(mlu_cuda_offload *eng, int64_t handle, void *stream, mlu_error *err);
/* Blocks the calling thread until the save (and load, if any) of handle finished. */
mlu_status mlu_cuda_offload_sync(mlu_cuda_offload *eng, int64_t handle, mlu_error *err);
/* Forgets `handle`; its buffer returns to the pool when its copies are done. */
mlu_status mlu_cuda_offload_release(mlu_cuda_offload *eng, int64_t handle, mlu_error *err);
/* The pool's counters and the number of live handles (released ones still copying included). */
mlu_status mlu_cuda_offload_stats(mlu_cuda_offload *eng, mlu_pool_stats *out, int64_t *handles,
                                  mlu_error *err);
/* The copy window: sets its limit in bytes when `limit` is not NULL (SIZE_MAX:
 * no bound), gives the limit and how many copies save waited for because the
 * window was full. */
mlu_status mlu_cuda_offload_window(mlu_cuda_offload *eng, const size_t *limit, size_t *cur_limit,
                                   uint64_t *waits, mlu_error *err);
/* Frees cached pinned buffers (after finishing pending releases); *freed bytes. */
mlu_status mlu_cuda_offload_trim(mlu_cuda_offload *eng, uint64_t *freed, mlu_error *err);

#ifdef __cplusplus
}
#endif
#endif
