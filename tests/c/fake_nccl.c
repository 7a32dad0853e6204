/* fake_nccl.c: a stand-in libnccl.so.2 for the loader's tests (no GPU, no
 * NCCL).  Every entry point exists and answers ncclInternalError except the
 * few the tests call.  Build switches:
 *   -DFAKE_VERSION=n     what ncclGetVersion reports (default 22103, "2.21.3")
 *   -DFAKE_OMIT_ALLREDUCE  leave out the required ncclAllReduce
 *   -DFAKE_NO_LASTERROR  leave out the optional ncclGetLastError
 *   -DFAKE_WORKING       communicators initialise and every call succeeds
 *   -DFAKE_HANG          non-blocking initialisation never completes
 *                        (ncclCommGetAsyncError keeps answering ncclInProgress)
 *   -DFAKE_HANG_CALLS    communicators initialise; an ncclAllReduce never
 *                        completes (ncclInProgress from then on) */
#include <stddef.h>
#include <string.h>

#ifndef FAKE_VERSION
#define FAKE_VERSION 22103
#endif

#define EXPORT __attribute__((visibility("default")))
#define FAIL_STUB(name) EXPORT int name(void) { return 3; }

EXPORT int ncclGetVersion(int *version)
{
    *version = FAKE_VERSION;
    return 0;
}

/* Bytes 0..127 = i ^ 0x5a, then a counter in byte 0 so two ids differ. */
EXPORT int ncclGetUniqueId(char *id)
{
    static unsigned char counter;
    int i;

    for (i = 0; i < 128; i++)
        id[i] = (char)(i ^ 0x5a);
    id[0] = (char)++counter;
    return 0;
}

EXPORT const char *ncclGetErrorString(int result)
{
    return result == 3 ? "fake internal error" : "fake error";
}

#ifndef FAKE_NO_LASTERROR
EXPORT const char *ncclGetLastError(void *comm)
{
    (void)comm;
    return "fake last error";
}
#endif

#if defined(FAKE_WORKING) || defined(FAKE_HANG) || defined(FAKE_HANG_CALLS)
static int fake_comm_storage;
static int fake_pending; /* an ncclAllReduce is in progress for ever (FAKE_HANG_CALLS) */
#ifdef FAKE_HANG
#define INIT_RESULT 7
#else
#define INIT_RESULT 0
#endif
EXPORT int ncclCommInitRank(void **comm, int nranks, char id[128], int rank)
{
    (void)nranks, (void)id, (void)rank;
    *comm = &fake_comm_storage;
    return INIT_RESULT;
}
EXPORT int ncclCommInitRankConfig(void **comm, int nranks, char id[128], int rank, void *config)
{
    (void)nranks, (void)id, (void)rank, (void)config;
    *comm = &fake_comm_storage;
    return INIT_RESULT;
}
EXPORT int ncclCommGetAsyncError(void *comm, int *result)
{
    (void)comm;
    *result = fake_pending ? 7 : INIT_RESULT;
    return 0;
}
#define OK_STUB(name) EXPORT int name(void) { return 0; }
OK_STUB(ncclCommDestroy)
OK_STUB(ncclCommAbort)
OK_STUB(ncclCommFinalize)
OK_STUB(ncclCommCount)
OK_STUB(ncclCommUserRank)
#ifdef FAKE_HANG_CALLS
EXPORT int ncclAllReduce(void)
{
    fake_pending = 1;
    return 7;
}
#else
OK_STUB(ncclAllReduce)
#endif
OK_STUB(ncclBroadcast)
OK_STUB(ncclAllGather)
OK_STUB(ncclReduceScatter)
OK_STUB(ncclSend)
OK_STUB(ncclRecv)
OK_STUB(ncclGroupStart)
OK_STUB(ncclGroupEnd)
#else
FAIL_STUB(ncclCommInitRank)
FAIL_STUB(ncclCommInitRankConfig)
FAIL_STUB(ncclCommDestroy)
FAIL_STUB(ncclCommAbort)
FAIL_STUB(ncclCommFinalize)
FAIL_STUB(ncclCommGetAsyncError)
FAIL_STUB(ncclCommCount)
FAIL_STUB(ncclCommUserRank)
#ifndef FAKE_OMIT_ALLREDUCE
FAIL_STUB(ncclAllReduce)
#endif
FAIL_STUB(ncclBroadcast)
FAIL_STUB(ncclAllGather)
FAIL_STUB(ncclReduceScatter)
FAIL_STUB(ncclSend)
FAIL_STUB(ncclRecv)
FAIL_STUB(ncclGroupStart)
FAIL_STUB(ncclGroupEnd)
#endif
