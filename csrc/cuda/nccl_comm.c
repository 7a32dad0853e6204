/* nccl_comm.c: collectives through the loaded NCCL (CUDA builds only; see
 * stub.c for the rest).  Plain C: NCCL is reached through the symbol table
 * and streams are opaque, so no CUDA header is needed. */
#define _GNU_SOURCE
#include "nccl_comm.h"

#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../core/alloc.h"

struct mlu_nccl_comm {
    const mlu_nccl_lib *lib; /* borrowed: outlives every communicator */
    mlu_nccl_handle comm;    /* NULL once aborted or destroyed */
    int rank;
    int size;
    double timeout_s;        /* > 0: non-blocking, polled */
    int timed_out;
};

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void nap(void)
{
    struct timespec ts = {0, 200000}; /* 0.2 ms */
    nanosleep(&ts, NULL);
}

/* Turns the result of an NCCL call into a status; in non-blocking mode waits
 * (polling the communicator) while it is in progress, aborting at the deadline. */
static mlu_status settle(mlu_nccl_comm *c, const char *what, int rc, mlu_error *err)
{
    mlu_status status = MLU_EDEVICE;
    double deadline;
    int poll_rc;

    if (rc == MLU_NCCL_IN_PROGRESS && c->timeout_s > 0 && c->comm != NULL) {
        deadline = now_s() + c->timeout_s;
        while (rc == MLU_NCCL_IN_PROGRESS) {
            if (now_s() > deadline) {
                c->timed_out = 1;
                (void)c->lib->api.CommAbort(c->comm);
                c->comm = NULL;
                status = mlu_error_set(err, MLU_ETIMEDOUT, -1,
                                       "%s did not complete within the timeout of %g s; "
                                       "the communicator was aborted", what, c->timeout_s);
                goto done;
            }
            nap();
            poll_rc = c->lib->api.CommGetAsyncError(c->comm, &rc);
            if (poll_rc != MLU_NCCL_SUCCESS) {
                mlu_nccl_fail(c->lib, c->comm, "ncclCommGetAsyncError", poll_rc, err);
                goto done;
            }
        }
    }
    if (rc != MLU_NCCL_SUCCESS) {
        mlu_nccl_fail(c->lib, c->comm, what, rc, err);
        goto done;
    }
    status = MLU_OK;
done:
    return status;
}

static mlu_status check_open(const mlu_nccl_comm *c, mlu_error *err)
{
    if (c->comm == NULL)
        return mlu_error_set(err, MLU_EINVAL, -1, "the NCCL communicator was %s",
                             c->timed_out ? "aborted after a timeout" : "aborted or destroyed");
    return MLU_OK;
}

static mlu_status check_dtype(const mlu_nccl_comm *c, int dtype, mlu_error *err)
{
    char have[32];

    if (dtype < 0 || dtype >= MLU_NCCL_DTYPE_COUNT)
        return mlu_error_set(err, MLU_EINVAL, -1, "unknown NCCL data type %d", dtype);
    if (!mlu_nccl_dtype_supported(c->lib, dtype)) {
        mlu_nccl_version_text(c->lib->version, have, sizeof(have));
        return mlu_error_set(err, MLU_EINVAL, -1,
                             "NCCL %s has no float8 type (float8 needs NCCL 2.24 or later)", have);
    }
    return MLU_OK;
}

static mlu_status check_op(int op, mlu_error *err)
{
    if (op < 0 || op >= MLU_NCCL_OP_COUNT)
        return mlu_error_set(err, MLU_EINVAL, -1, "unknown NCCL reduction %d", op);
    return MLU_OK;
}

static mlu_status check_rank(const mlu_nccl_comm *c, const char *what, int r, mlu_error *err)
{
    if (r < 0 || r >= c->size)
        return mlu_error_set(err, MLU_EINVAL, -1, "%s %d is not a rank of this communicator of %d",
                             what, r, c->size);
    return MLU_OK;
}

mlu_status mlu_nccl_comm_init(const mlu_nccl_lib *lib, int nranks, const mlu_nccl_unique_id *id,
                              int rank, double timeout_s, mlu_nccl_comm **out, mlu_error *err)
{
    mlu_status status = MLU_EINVAL;
    mlu_nccl_comm *c = NULL;
    mlu_nccl_config_v21400 config;
    int rc;

    *out = NULL;
    if (lib == NULL || lib->handle == NULL) {
        status = mlu_error_set(err, MLU_EINVAL, -1, "NCCL is not loaded");
        goto error;
    }
    if (nranks < 1 || rank < 0 || rank >= nranks) {
        status = mlu_error_set(err, MLU_EINVAL, -1, "rank %d of %d ranks is not a valid NCCL rank", rank,
                      nranks);
        goto error;
    }
    if (!(timeout_s >= 0) || timeout_s > 1e9) {
        status = mlu_error_set(err, MLU_EINVAL, -1, "timeout must be >= 0 seconds, got %g", timeout_s);
        goto error;
    }
    if (timeout_s > 0 && lib->api.CommInitRankConfig == NULL) {
        status = mlu_error_set(err, MLU_ENOTSUP, -1,
                                        "a timeout needs ncclCommInitRankConfig, which this NCCL lacks");
        goto error;
    }
    c = mlu_calloc(1, sizeof(*c));
    if (c == NULL) {
        status = mlu_error_set(err, MLU_ENOMEM, -1, "out of memory for an NCCL communicator");
        goto error;
    }
    c->lib = lib;
    c->rank = rank;
    c->size = nranks;
    c->timeout_s = timeout_s;
    if (timeout_s > 0) {
        memset(&config, 0, sizeof(config));
        config.size = sizeof(config);
        config.magic = MLU_NCCL_CONFIG_MAGIC;
        config.version = MLU_NCCL_CONFIG_VERSION;
        config.blocking = 0;
        config.cga_cluster_size = MLU_NCCL_CONFIG_UNDEF_INT;
        config.min_ctas = MLU_NCCL_CONFIG_UNDEF_INT;
        config.max_ctas = MLU_NCCL_CONFIG_UNDEF_INT;
        config.net_name = NULL;
        rc = lib->api.CommInitRankConfig(&c->comm, nranks, *id, rank, &config);
        if (rc != MLU_NCCL_SUCCESS && rc != MLU_NCCL_IN_PROGRESS) {
            status = mlu_nccl_fail(lib, c->comm, "ncclCommInitRankConfig", rc, err);
            goto error;
        }
        status = settle(c, "ncclCommInitRankConfig", rc, err);
    } else {
        rc = lib->api.CommInitRank(&c->comm, nranks, *id, rank);
        status = settle(c, "ncclCommInitRank", rc, err);
    }
    if (status != MLU_OK)
        goto error;
    *out = c;
    c = NULL;
    goto done;
error:
    /* status holds the failure; c (when allocated) is released below */
done:
    if (c != NULL) {
        if (c->comm != NULL)
            (void)lib->api.CommAbort(c->comm);
        mlu_free(c);
    }
    return status;
}

int mlu_nccl_comm_rank(const mlu_nccl_comm *c)
{
    return c->rank;
}

int mlu_nccl_comm_size(const mlu_nccl_comm *c)
{
    return c->size;
}

int mlu_nccl_comm_closed(const mlu_nccl_comm *c)
{
    return c->comm == NULL;
}

int mlu_nccl_comm_timed_out(const mlu_nccl_comm *c)
{
    return c->timed_out;
}

mlu_status mlu_nccl_comm_all_reduce(mlu_nccl_comm *c, const void *send, void *recv, size_t count,
                                    int dtype, int op, void *stream, mlu_error *err)
{
    if (check_open(c, err) || check_dtype(c, dtype, err) || check_op(op, err))
        return err->code;
    return settle(c, "ncclAllReduce",
                  c->lib->api.AllReduce(send, recv, count, dtype, op, c->comm, stream), err);
}

mlu_status mlu_nccl_comm_broadcast(mlu_nccl_comm *c, const void *send, void *recv, size_t count,
                                   int dtype, int root, void *stream, mlu_error *err)
{
    if (check_open(c, err) || check_dtype(c, dtype, err) || check_rank(c, "root", root, err))
        return err->code;
    return settle(c, "ncclBroadcast",
                  c->lib->api.Broadcast(send, recv, count, dtype, root, c->comm, stream), err);
}

mlu_status mlu_nccl_comm_all_gather(mlu_nccl_comm *c, const void *send, void *recv,
                                    size_t sendcount, int dtype, void *stream, mlu_error *err)
{
    if (check_open(c, err) || check_dtype(c, dtype, err))
        return err->code;
    return settle(c, "ncclAllGather",
                  c->lib->api.AllGather(send, recv, sendcount, dtype, c->comm, stream), err);
}

mlu_status mlu_nccl_comm_reduce_scatter(mlu_nccl_comm *c, const void *send, void *recv,
                                        size_t recvcount, int dtype, int op, void *stream,
                                        mlu_error *err)
{
    if (check_open(c, err) || check_dtype(c, dtype, err) || check_op(op, err))
        return err->code;
    return settle(c, "ncclReduceScatter",
                  c->lib->api.ReduceScatter(send, recv, recvcount, dtype, op, c->comm, stream),
                  err);
}

mlu_status mlu_nccl_comm_send(mlu_nccl_comm *c, const void *buf, size_t count, int dtype,
                              int peer, void *stream, mlu_error *err)
{
    if (check_open(c, err) || check_dtype(c, dtype, err) || check_rank(c, "peer", peer, err))
        return err->code;
    return settle(c, "ncclSend", c->lib->api.Send(buf, count, dtype, peer, c->comm, stream), err);
}

mlu_status mlu_nccl_comm_recv(mlu_nccl_comm *c, void *buf, size_t count, int dtype, int peer,
                              void *stream, mlu_error *err)
{
    if (check_open(c, err) || check_dtype(c, dtype, err) || check_rank(c, "peer", peer, err))
        return err->code;
    return settle(c, "ncclRecv", c->lib->api.Recv(buf, count, dtype, peer, c->comm, stream), err);
}

mlu_status mlu_nccl_comm_group_start(mlu_nccl_comm *c, mlu_error *err)
{
    if (check_open(c, err))
        return err->code;
    return settle(c, "ncclGroupStart", c->lib->api.GroupStart(), err);
}

mlu_status mlu_nccl_comm_group_end(mlu_nccl_comm *c, mlu_error *err)
{
    if (check_open(c, err))
        return err->code;
    return settle(c, "ncclGroupEnd", c->lib->api.GroupEnd(), err);
}

mlu_status mlu_nccl_comm_async_error(mlu_nccl_comm *c, int *result, mlu_error *err)
{
    int rc;

    *result = MLU_NCCL_SUCCESS;
    if (check_open(c, err))
        return err->code;
    rc = c->lib->api.CommGetAsyncError(c->comm, result);
    if (rc != MLU_NCCL_SUCCESS)
        return mlu_nccl_fail(c->lib, c->comm, "ncclCommGetAsyncError", rc, err);
    return MLU_OK;
}

/* Closes the NCCL communicator with close_fn (ncclCommAbort or
 * ncclCommDestroy, named `what`); nothing when it is closed already. */
static mlu_status close_with(mlu_nccl_comm *c, int (*close_fn)(mlu_nccl_handle), const char *what,
                             mlu_error *err)
{
    int rc;
    mlu_nccl_handle comm = c->comm;

    if (comm == NULL)
        return MLU_OK;
    c->comm = NULL;
    rc = close_fn(comm);
    if (rc != MLU_NCCL_SUCCESS)
        return mlu_nccl_fail(c->lib, NULL, what, rc, err);
    return MLU_OK;
}

mlu_status mlu_nccl_comm_abort(mlu_nccl_comm *c, mlu_error *err)
{
    return close_with(c, c->lib->api.CommAbort, "ncclCommAbort", err);
}

mlu_status mlu_nccl_comm_destroy(mlu_nccl_comm *c, mlu_error *err)
{
    return close_with(c, c->lib->api.CommDestroy, "ncclCommDestroy", err);
}

void mlu_nccl_comm_free(mlu_nccl_comm *c)
{
    mlu_error err;

    if (c == NULL)
        return;
    mlu_error_clear(&err);
    (void)mlu_nccl_comm_destroy(c, &err);
    mlu_free(c);
}
