/* nccl_loader.c: find libnccl.so.2, resolve one table of symbols, check the
 * version.  Pure C + dlfcn: builds and is unit-tested without CUDA. */
#define _GNU_SOURCE
#include "nccl_loader.h"

#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define NCCL_SONAME "libnccl.so.2"

const char *const mlu_nccl_dtype_names[MLU_NCCL_DTYPE_COUNT] = {
    [MLU_NCCL_INT8] = "int8",
    [MLU_NCCL_UINT8] = "uint8",
    [MLU_NCCL_INT32] = "int32",
    [MLU_NCCL_UINT32] = "uint32",
    [MLU_NCCL_INT64] = "int64",
    [MLU_NCCL_UINT64] = "uint64",
    [MLU_NCCL_FLOAT16] = "float16",
    [MLU_NCCL_FLOAT32] = "float32",
    [MLU_NCCL_FLOAT64] = "float64",
    [MLU_NCCL_BFLOAT16] = "bfloat16",
    [MLU_NCCL_FLOAT8E4M3] = "float8_e4m3fn",
    [MLU_NCCL_FLOAT8E5M2] = "float8_e5m2",
};

const char *const mlu_nccl_op_names[MLU_NCCL_OP_COUNT] = {
    [MLU_NCCL_SUM] = "sum",
    [MLU_NCCL_PROD] = "prod",
    [MLU_NCCL_MAX] = "max",
    [MLU_NCCL_MIN] = "min",
    [MLU_NCCL_AVG] = "avg",
};

/* The one table: every symbol, where it goes, whether the library must have it. */
static const struct nccl_symbol {
    const char *name;
    size_t offset;
    int required;
} nccl_symbols[] = {
#define REQ(field) {"nccl" #field, offsetof(mlu_nccl_api, field), 1}
#define OPT(field) {"nccl" #field, offsetof(mlu_nccl_api, field), 0}
    REQ(GetVersion),
    REQ(GetUniqueId),
    REQ(CommInitRank),
    REQ(CommDestroy),
    REQ(CommAbort),
    REQ(CommGetAsyncError),
    REQ(CommCount),
    REQ(CommUserRank),
    REQ(GetErrorString),
    REQ(AllReduce),
    REQ(Broadcast),
    REQ(AllGather),
    REQ(ReduceScatter),
    REQ(Send),
    REQ(Recv),
    REQ(GroupStart),
    REQ(GroupEnd),
    OPT(GetLastError),
    OPT(CommInitRankConfig),
    OPT(CommFinalize),
#undef REQ
#undef OPT
};

/* Appends printf text to report (always NUL-terminated, silently cut when full). */
static void report_add(char *report, size_t cap, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;
static void report_add(char *report, size_t cap, const char *fmt, ...)
{
    va_list ap;
    size_t used;

    if (report == NULL || cap == 0)
        return;
    used = strnlen(report, cap);
    if (used >= cap - 1)
        return;
    va_start(ap, fmt);
    (void)vsnprintf(report + used, cap - used, fmt, ap);
    va_end(ap);
}

void mlu_nccl_version_text(int code, char *out, size_t cap)
{
    int major, minor, patch;

    /* NCCL_VERSION: X*1000+Y*100+Z up to 2.8, X*10000+Y*100+Z after. */
    if (code >= 10000) {
        major = code / 10000;
        minor = (code % 10000) / 100;
    } else {
        major = code / 1000;
        minor = (code % 1000) / 100;
    }
    patch = code % 100;
    (void)snprintf(out, cap, "%d.%d.%d", major, minor, patch);
}

/* Resolves the table into lib->api; 0, or -1 with the first missing required symbol in *missing. */
static int resolve_symbols(void *handle, mlu_nccl_api *api, const char **missing)
{
    size_t i;
    void *sym;

    memset(api, 0, sizeof(*api));
    for (i = 0; i < sizeof(nccl_symbols) / sizeof(nccl_symbols[0]); i++) {
        (void)dlerror();
        sym = dlsym(handle, nccl_symbols[i].name);
        if (sym == NULL && nccl_symbols[i].required) {
            *missing = nccl_symbols[i].name;
            return -1;
        }
        /* A data pointer from dlsym is the function's address (POSIX). */
        memcpy((char *)api + nccl_symbols[i].offset, &sym, sizeof(sym));
    }
    return 0;
}

/* Tries one candidate; 1 when lib is now loaded, 0 when not (the reason
 * appended to report).  `path` NULL with `noload` set looks only for an
 * already loaded copy. */
static int try_candidate(mlu_nccl_lib *lib, const char *path, int noload, const char *label,
                         char *report, size_t cap)
{
    void *handle = NULL;
    const char *missing = NULL, *why;
    char have[32], need[32];
    int version = 0, rc, loaded = 0;
    struct stat sb;

    if (!noload && strchr(path, '/') != NULL && stat(path, &sb) != 0) {
        report_add(report, cap, "  %s: %s: not found\n", label, path);
        goto done;
    }
    handle = dlopen(path, RTLD_NOW | RTLD_LOCAL | (noload ? RTLD_NOLOAD : 0));
    if (handle == NULL) {
        why = dlerror();
        if (noload)
            report_add(report, cap, "  %s: none loaded\n", label);
        else
            report_add(report, cap, "  %s: %s: %s\n", label, path, why ? why : "dlopen failed");
        goto done;
    }
    if (resolve_symbols(handle, &lib->api, &missing) < 0) {
        report_add(report, cap, "  %s: %s: lacks the required symbol %s (not an NCCL library?)\n",
                   label, path, missing);
        goto done;
    }
    rc = lib->api.GetVersion(&version);
    if (rc != MLU_NCCL_SUCCESS) {
        report_add(report, cap, "  %s: %s: ncclGetVersion failed (result %d)\n", label, path, rc);
        goto done;
    }
    if (version < MLU_NCCL_MIN_VERSION) {
        mlu_nccl_version_text(version, have, sizeof(have));
        mlu_nccl_version_text(MLU_NCCL_MIN_VERSION, need, sizeof(need));
        report_add(report, cap, "  %s: %s: NCCL %s is too old (mlutils needs %s or later)\n",
                   label, path, have, need);
        goto done;
    }
    lib->handle = handle;
    lib->version = version;
    handle = NULL;
    if (noload) {
        /* dlinfo would need the link map; the soname says enough. */
        (void)snprintf(lib->path, sizeof(lib->path), "%s (already loaded)", NCCL_SONAME);
    } else {
        (void)snprintf(lib->path, sizeof(lib->path), "%s", path);
    }
    loaded = 1;
done:
    if (handle != NULL)
        dlclose(handle);
    if (!loaded)
        memset(&lib->api, 0, sizeof(lib->api));
    return loaded;
}

/* dir + "/libnccl.so.2" into buf; 0, or -1 when it does not fit. */
static int join_path(char *buf, size_t cap, const char *dir, const char *sub)
{
    int n = snprintf(buf, cap, "%s%s%s", dir, sub, NCCL_SONAME);
    return (n < 0 || (size_t)n >= cap) ? -1 : 0;
}

static int is_directory(const char *path)
{
    struct stat sb;
    return stat(path, &sb) == 0 && S_ISDIR(sb.st_mode);
}

mlu_status mlu_nccl_open(mlu_nccl_lib *lib, const char *const *dirs, size_t ndirs,
                         char *report, size_t report_cap, mlu_error *err)
{
    mlu_status status = MLU_ENOTSUP;
    char buf[MLU_NCCL_PATH_MAX];
    const char *explicit_path = getenv("MLUTILS_NCCL_PATH");
    const char *homes[2];
    const char *label;
    size_t i;

    memset(lib, 0, sizeof(*lib));
    if (report != NULL && report_cap > 0)
        report[0] = '\0';
    if (explicit_path != NULL && explicit_path[0] != '\0') {
        label = "MLUTILS_NCCL_PATH";
        if (is_directory(explicit_path)) {
            if (join_path(buf, sizeof(buf), explicit_path, "/") < 0) {
                report_add(report, report_cap, "  %s: path too long\n", label);
                goto fail;
            }
            explicit_path = buf;
        }
        if (try_candidate(lib, explicit_path, 0, label, report, report_cap))
            goto ok;
        goto fail;
    }
    if (try_candidate(lib, NCCL_SONAME, 1, "already in this process", report, report_cap))
        goto ok;
    for (i = 0; i < ndirs; i++) {
        if (dirs[i] == NULL || dirs[i][0] == '\0')
            continue;
        if (join_path(buf, sizeof(buf), dirs[i], "/") < 0) {
            report_add(report, report_cap, "  pip wheel: %s: path too long\n", dirs[i]);
            continue;
        }
        if (try_candidate(lib, buf, 0, "pip wheel", report, report_cap))
            goto ok;
    }
    homes[0] = getenv("CUDA_HOME");
    homes[1] = getenv("CUDA_PATH");
    for (i = 0; i < 2; i++) {
        if (homes[i] == NULL || homes[i][0] == '\0')
            continue;
        if (join_path(buf, sizeof(buf), homes[i], "/lib64/") < 0)
            continue;
        if (try_candidate(lib, buf, 0, i == 0 ? "CUDA_HOME" : "CUDA_PATH", report, report_cap))
            goto ok;
    }
    if (try_candidate(lib, "/usr/local/cuda/lib64/" NCCL_SONAME, 0, "CUDA install", report,
                      report_cap))
        goto ok;
    if (try_candidate(lib, NCCL_SONAME, 0, "system library path", report, report_cap))
        goto ok;
fail:
    mlu_error_set(err, MLU_ENOTSUP, -1, "NCCL (%s) could not be loaded", NCCL_SONAME);
    goto done;
ok:
    status = MLU_OK;
done:
    return status;
}

void mlu_nccl_close(mlu_nccl_lib *lib)
{
    if (lib == NULL)
        return;
    if (lib->handle != NULL)
        dlclose(lib->handle);
    memset(lib, 0, sizeof(*lib));
}

int mlu_nccl_dtype_supported(const mlu_nccl_lib *lib, int dtype)
{
    if (dtype < 0 || dtype >= MLU_NCCL_DTYPE_COUNT)
        return 0;
    if (dtype == MLU_NCCL_FLOAT8E4M3 || dtype == MLU_NCCL_FLOAT8E5M2)
        return lib->version >= MLU_NCCL_FP8_VERSION;
    return 1;
}

mlu_status mlu_nccl_fail(const mlu_nccl_lib *lib, mlu_nccl_handle comm, const char *what,
                         int result, mlu_error *err)
{
    const char *text = NULL, *last = NULL;

    if (lib->api.GetErrorString != NULL)
        text = lib->api.GetErrorString(result);
    if (comm != NULL && lib->api.GetLastError != NULL)
        last = lib->api.GetLastError(comm);
    else if (lib->api.GetLastError != NULL)
        last = lib->api.GetLastError(NULL);
    if (last != NULL && last[0] != '\0')
        return mlu_error_set(err, MLU_EDEVICE, -1, "%s failed (NCCL result %d): %s: %s", what,
                             result, text ? text : "unknown error", last);
    return mlu_error_set(err, MLU_EDEVICE, -1, "%s failed (NCCL result %d): %s", what, result,
                         text ? text : "unknown error");
}

mlu_status mlu_nccl_unique_id_new(const mlu_nccl_lib *lib, mlu_nccl_unique_id *out,
                                  mlu_error *err)
{
    int rc;

    memset(out, 0, sizeof(*out));
    if (lib->handle == NULL)
        return mlu_error_set(err, MLU_EINVAL, -1, "NCCL is not loaded");
    rc = lib->api.GetUniqueId(out);
    if (rc != MLU_NCCL_SUCCESS)
        return mlu_nccl_fail(lib, NULL, "ncclGetUniqueId", rc, err);
    return MLU_OK;
}
