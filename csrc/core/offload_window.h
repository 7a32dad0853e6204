/* offload_window.h: the bound on device-to-host copies in flight.
 *
 * An offload leaves its source in device memory until the copy stream has
 * read it, and the caller's stream never waits for that copy.  When the
 * caller makes activations faster than the link drains them (a context that
 * offloads every saved tensor does), that backlog is device memory the
 * caching allocator cannot hand out again: unbounded, it grows to all the
 * activations of the forward pass.
 *
 * The window is a FIFO of the copies not known to be done, with their bytes.
 * After each new copy, `settle` drops the ones that have finished, then,
 * while the bytes in the window exceed the limit and more than the newest
 * copy is left, waits for the oldest one and drops it.  So the sources
 * waiting for a copy never hold more than the limit plus the newest copy's
 * bytes.  On CUDA the wait blocks the calling thread (cudaEventSynchronize):
 * torch's caching allocator decides on the host when a copied source's
 * memory may be reused, so a wait only on the device (the host running on
 * ahead) would bound the copies in flight but not the memory they hold.
 *
 * Pure C: finished/wait are callbacks (CUDA events in csrc/cuda/offload.cu,
 * fakes in tests/c/test_offload_window.c).  Not thread-safe: the caller
 * serialises calls. */
#ifndef MLU_OFFLOAD_WINDOW_H
#define MLU_OFFLOAD_WINDOW_H

#include "../mlu.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct mlu_window_entry {
    int64_t handle;
    size_t nbytes;
} mlu_window_entry;

typedef struct mlu_offload_window {
    size_t limit;            /* bytes (SIZE_MAX: no bound) */
    size_t bytes;            /* bytes of the copies in the window */
    mlu_window_entry *ring;  /* owned */
    size_t head, len, cap;
    uint64_t waits;          /* copies waited for because the window was full */
} mlu_offload_window;

/* finished: 1 when the copy of `handle` is done (or the handle is gone),
 * 0 when it is still running, -1 with err set on failure.
 * wait: returns once the copy of `handle` is done. */
typedef int (*mlu_window_finished_fn)(void *ctx, int64_t handle, mlu_error *err);
typedef mlu_status (*mlu_window_wait_fn)(void *ctx, int64_t handle, mlu_error *err);

void mlu_offload_window_init(mlu_offload_window *w, size_t limit);
void mlu_offload_window_free(mlu_offload_window *w);
/* Adds a copy of nbytes (the newest). */
mlu_status mlu_offload_window_push(mlu_offload_window *w, int64_t handle, size_t nbytes, mlu_error *err);
/* Drops finished copies from the front, then waits for the oldest ones
 * until the window is within its limit (see above). */
mlu_status mlu_offload_window_settle(mlu_offload_window *w, mlu_window_finished_fn finished,
                                     mlu_window_wait_fn wait, void *ctx, mlu_error *err);

#ifdef __cplusplus
}
#endif
#endif
