/* nccl_loader.h: NCCL loaded at run time (dlopen), through one symbol table.
 *
 * Pure C with <dlfcn.h>: no CUDA and no NCCL header is needed to build or
 * test it.  The few NCCL types used are declared here from NCCL's documented
 * ABI (ncclResult_t, ncclDataType_t and ncclRedOp_t are C enums passed as
 * int; ncclComm_t is an opaque pointer; ncclUniqueId is 128 bytes; streams
 * are cudaStream_t, passed as void*). */
#ifndef MLU_NCCL_LOADER_H
#define MLU_NCCL_LOADER_H

#include "../mlu.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Oldest NCCL accepted (ncclGetVersion code; 2.18.0). */
#define MLU_NCCL_MIN_VERSION 21800
/* float8 (e4m3, e5m2) reductions: NCCL 2.24 and later. */
#define MLU_NCCL_FP8_VERSION 22400
#define MLU_NCCL_UNIQUE_ID_BYTES 128
/* Room for the path of the library that was loaded. */
#define MLU_NCCL_PATH_MAX 1024

typedef struct mlu_nccl_opaque_comm *mlu_nccl_handle; /* ncclComm_t */
typedef struct mlu_nccl_unique_id {
    char internal[MLU_NCCL_UNIQUE_ID_BYTES];
} mlu_nccl_unique_id; /* ncclUniqueId, passed by value */

/* ncclResult_t values */
enum {
    MLU_NCCL_SUCCESS = 0,
    MLU_NCCL_UNHANDLED_CUDA_ERROR = 1,
    MLU_NCCL_SYSTEM_ERROR = 2,
    MLU_NCCL_INTERNAL_ERROR = 3,
    MLU_NCCL_INVALID_ARGUMENT = 4,
    MLU_NCCL_INVALID_USAGE = 5,
    MLU_NCCL_REMOTE_ERROR = 6,
    MLU_NCCL_IN_PROGRESS = 7
};

/* ncclDataType_t values: the one statement of them (Python reads them, with
 * their names, from _core.nccl_dtypes; mlutils.distributed.NCCL_DTYPES) */
enum mlu_nccl_dtype {
    MLU_NCCL_INT8 = 0,
    MLU_NCCL_UINT8 = 1,
    MLU_NCCL_INT32 = 2,
    MLU_NCCL_UINT32 = 3,
    MLU_NCCL_INT64 = 4,
    MLU_NCCL_UINT64 = 5,
    MLU_NCCL_FLOAT16 = 6,
    MLU_NCCL_FLOAT32 = 7,
    MLU_NCCL_FLOAT64 = 8,
    MLU_NCCL_BFLOAT16 = 9,
    MLU_NCCL_FLOAT8E4M3 = 10,
    MLU_NCCL_FLOAT8E5M2 = 11,
    MLU_NCCL_DTYPE_COUNT = 12
};

/* ncclRedOp_t values (built-in operations; _core.nccl_ops) */
enum mlu_nccl_op {
    MLU_NCCL_SUM = 0,
    MLU_NCCL_PROD = 1,
    MLU_NCCL_MAX = 2,
    MLU_NCCL_MIN = 3,
    MLU_NCCL_AVG = 4,
    MLU_NCCL_OP_COUNT = 5
};

/* The name of each data type (torch's: "float32", "float8_e4m3fn") and of
 * each reduction ("sum"), indexed by its value. */
extern const char *const mlu_nccl_dtype_names[MLU_NCCL_DTYPE_COUNT];
extern const char *const mlu_nccl_op_names[MLU_NCCL_OP_COUNT];

/* The communicator configuration as NCCL 2.14 first defined it.  The struct
 * is versioned: NCCL starts from its own defaults, copies `size` bytes over
 * them, checks `magic`, and resets every field newer than `version` to its
 * default, so this prefix with version 2.14 sets `blocking` alone. */
typedef struct mlu_nccl_config_v21400 {
    size_t size;
    unsigned int magic;
    unsigned int version;
    int blocking;
    int cga_cluster_size;
    int min_ctas;
    int max_ctas;
    const char *net_name;
} mlu_nccl_config_v21400;
#define MLU_NCCL_CONFIG_MAGIC 0xcafebeefu
#define MLU_NCCL_CONFIG_VERSION 21400u
#define MLU_NCCL_CONFIG_UNDEF_INT (-2147483647 - 1)

/* Every NCCL entry point mlutils calls; filled from one table in
 * nccl_loader.c.  Optional ones are NULL when the library lacks them. */
typedef struct mlu_nccl_api {
    /* required */
    int (*GetVersion)(int *version);
    int (*GetUniqueId)(mlu_nccl_unique_id *id);
    int (*CommInitRank)(mlu_nccl_handle *comm, int nranks, mlu_nccl_unique_id id, int rank);
    int (*CommDestroy)(mlu_nccl_handle comm);
    int (*CommAbort)(mlu_nccl_handle comm);
    int (*CommGetAsyncError)(mlu_nccl_handle comm, int *async_error);
    int (*CommCount)(mlu_nccl_handle comm, int *count);
    int (*CommUserRank)(mlu_nccl_handle comm, int *rank);
    const char *(*GetErrorString)(int result);
    int (*AllReduce)(const void *send, void *recv, size_t count, int dtype, int op,
                     mlu_nccl_handle comm, void *stream);
    int (*Broadcast)(const void *send, void *recv, size_t count, int dtype, int root,
                     mlu_nccl_handle comm, void *stream);
    int (*AllGather)(const void *send, void *recv, size_t sendcount, int dtype,
                     mlu_nccl_handle comm, void *stream);
    int (*ReduceScatter)(const void *send, void *recv, size_t recvcount, int dtype, int op,
                         mlu_nccl_handle comm, void *stream);
    int (*Send)(const void *send, size_t count, int dtype, int peer, mlu_nccl_handle comm,
                void *stream);
    int (*Recv)(void *recv, size_t count, int dtype, int peer, mlu_nccl_handle comm,
                void *stream);
    int (*GroupStart)(void);
    int (*GroupEnd)(void);
    /* optional */
    const char *(*GetLastError)(mlu_nccl_handle comm);
    int (*CommInitRankConfig)(mlu_nccl_handle *comm, int nranks, mlu_nccl_unique_id id, int rank,
                              mlu_nccl_config_v21400 *config);
    int (*CommFinalize)(mlu_nccl_handle comm);
} mlu_nccl_api;

/* One loaded library.  Owned by whoever called mlu_nccl_open; handle is
 * released by mlu_nccl_close. */
typedef struct mlu_nccl_lib {
    void *handle;                  /* dlopen handle, NULL when not loaded */
    int version;                   /* ncclGetVersion code, e.g. 22103 */
    char path[MLU_NCCL_PATH_MAX];  /* where it was found */
    mlu_nccl_api api;
} mlu_nccl_lib;

/* Loads libnccl.so.2, trying in order and stopping at the first usable one:
 *   1. $MLUTILS_NCCL_PATH (a file, or a directory holding libnccl.so.2) and
 *      nothing else when it is set;
 *   2. a libnccl.so.2 this process already loaded (e.g. by PyTorch);
 *   3. each of dirs[0..ndirs) (the nvidia-nccl pip wheels' lib folders);
 *   4. $CUDA_HOME/lib64, $CUDA_PATH/lib64, /usr/local/cuda/lib64;
 *   5. the system library path (dlopen("libnccl.so.2")).
 * A library is usable when every required symbol resolves and its version is
 * at least MLU_NCCL_MIN_VERSION.  `report` (report_cap bytes, always
 * NUL-terminated) receives one line per place tried and why it was not
 * used; on failure err says so in short (MLU_ENOTSUP). */
mlu_status mlu_nccl_open(mlu_nccl_lib *lib, const char *const *dirs, size_t ndirs,
                         char *report, size_t report_cap, mlu_error *err);
void mlu_nccl_close(mlu_nccl_lib *lib);

/* "2.21.5" from a version code (both of NCCL's encodings). */
void mlu_nccl_version_text(int code, char *out, size_t cap);
/* 1 when the loaded version supports dtype (float8 needs 2.24). */
int mlu_nccl_dtype_supported(const mlu_nccl_lib *lib, int dtype);
/* "ncclX failed: <error string>[: <last error>]" into err, MLU_EDEVICE. */
mlu_status mlu_nccl_fail(const mlu_nccl_lib *lib, mlu_nccl_handle comm, const char *what,
                         int result, mlu_error *err);
/* A fresh unique id (ncclGetUniqueId; needs no GPU). */
mlu_status mlu_nccl_unique_id_new(const mlu_nccl_lib *lib, mlu_nccl_unique_id *out,
                                  mlu_error *err);

#ifdef __cplusplus
}
#endif
#endif
