/* offload_window.h: the bound on device-to-host copies in flight.
 *
 * An offload leaves its source in device memory until the copy stream has
 * read it, and the caller's stream never waits for that copy.  When the
 * caller makes activations faster than the link drains them (a context that
 * offloads every saved tensor does), that backlog is device memory the
 * caching allocator cannot hand out again: unbounded, it grows to all the
 * activations of the forward pass.
 *
 * The window is a FIFO of the copies the caller's stream is not yet ordered
 * after, with their bytes.  After each new copy, `settle` drops the ones
 * that have finished, then, while the bytes in the window exceed the limit
 * and more than the newest copy is left, orders the caller's stream after the
 * oldest one (on CUDA a cudaStreamWaitEvent: the device waits, the host does
 * not) and drops it.  So the sources waiting for a copy never hold more than
 * the limit plus the newest copy's bytes.
 *
 * Pure C: finished/order are callbacks (CUDA events in csrc/cuda/offload.cu,
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
    uint64_t waits;          /* times the caller's stream was made to wait */
} mlu_offload_window;

/* finished: 1 when the copy of `handle` is done (or the handle is gone),
 * 0 when it is still running, -1 with err set on failure.
 * order: makes the caller's stream wait for the copy of `handle`. */
typedef int (*mlu_window_finished_fn)(void *ctx, int64_t handle, mlu_error *err);
typedef mlu_status (*mlu_window_order_fn)(void *ctx, int64_t handle, mlu_error *err);

void mlu_offload_window_init(mlu_offload_window *w, size_t limit);
void mlu_offload_window_free(mlu_offload_window *w);
/* Adds a copy of nbytes (the newest). */
mlu_status mlu_offload_window_push(mlu_offload_window *w, int64_t handle, size_t nbytes, mlu_error *err);
/* Drops finished copies from the front, then orders the caller after the
 * oldest ones until the window is within its limit (see above). */
mlu_status mlu_offload_window_settle(mlu_offload_window *w, mlu_window_finished_fn finished,
                                     mlu_window_order_fn order, void *ctx, mlu_error *err);

#ifdef __cplusplus
}
#endif
#endif
