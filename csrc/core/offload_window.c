/* offload_window.c: see offload_window.h. */
#include "offload_window.h"

#include <string.h>

#include "alloc.h"

void mlu_offload_window_init(mlu_offload_window *w, size_t limit)
{
    memset(w, 0, sizeof(*w));
    w->limit = limit;
}

void mlu_offload_window_free(mlu_offload_window *w)
{
    mlu_free(w->ring);
    memset(w, 0, sizeof(*w));
}

/* Grows the ring; the entries that ran from head to the old end move to the
 * new end, so the ring stays in order. */
static mlu_status grow(mlu_offload_window *w, mlu_error *err)
{
    size_t old = w->cap, upper;
    mlu_status st = mlu_grow((void **)&w->ring, &w->cap, w->len + 1, sizeof(*w->ring), SIZE_MAX,
                             "the offload copy window", err);

    if (st != MLU_OK || old == 0 || w->head == 0)
        return st;
    upper = old - w->head;
    memmove(w->ring + (w->cap - upper), w->ring + w->head, upper * sizeof(*w->ring));
    w->head = w->cap - upper;
    return MLU_OK;
}

mlu_status mlu_offload_window_push(mlu_offload_window *w, int64_t handle, size_t nbytes, mlu_error *err)
{
    mlu_status st = MLU_OK;

    if (w->len == w->cap && (st = grow(w, err)) != MLU_OK)
        return st;
    w->ring[(w->head + w->len) % w->cap] = (mlu_window_entry){handle, nbytes};
    w->len++;
    /* saturating: a window this large is over any limit anyway */
    if (mlu_add_overflow_size(w->bytes, nbytes, &w->bytes))
        w->bytes = SIZE_MAX;
    return st;
}

static void drop_front(mlu_offload_window *w)
{
    w->bytes -= w->bytes < w->ring[w->head].nbytes ? w->bytes : w->ring[w->head].nbytes;
    w->head = (w->head + 1) % w->cap;
    w->len--;
    if (w->len == 0)
        w->bytes = 0;
}

mlu_status mlu_offload_window_settle(mlu_offload_window *w, mlu_window_finished_fn finished,
                                     mlu_window_wait_fn wait, void *ctx, mlu_error *err)
{
    mlu_status st = MLU_OK;

    while (w->len > 0) {
        int done = finished(ctx, w->ring[w->head].handle, err);
        if (done < 0)
            return err->code;
        if (!done)
            break;
        drop_front(w);
    }
    while (w->len > 1 && w->bytes > w->limit) {
        st = wait(ctx, w->ring[w->head].handle, err);
        if (st != MLU_OK)
            return st;
        w->waits++;
        drop_front(w);
    }
    return st;
}
