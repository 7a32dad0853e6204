/* Unit tests of the NCCL loader against fake libraries (tests/c/fake_nccl.c,
 * built by the Makefile into FAKE_DIR): search order, symbol table, version
 * refusal, error reports.  No GPU and no NCCL needed. */
#define _GNU_SOURCE
#include <stdlib.h>

#include "mlu_test.h"
#include "cuda/nccl_loader.h"

#ifndef FAKE_DIR
#error "FAKE_DIR must name the folder of the fake NCCL libraries"
#endif

static char report[8192];

static mlu_status open_with(const char *env_path, const char *const *dirs, size_t n,
                            mlu_nccl_lib *lib, mlu_error *err)
{
    if (env_path != NULL)
        setenv("MLUTILS_NCCL_PATH", env_path, 1);
    else
        unsetenv("MLUTILS_NCCL_PATH");
    mlu_error_clear(err);
    return mlu_nccl_open(lib, dirs, n, report, sizeof(report), err);
}

static void test_explicit_file(void)
{
    mlu_nccl_lib lib;
    mlu_error err;
    mlu_nccl_unique_id a, b;
    int i, pattern_ok = 1;

    CHECK(open_with(FAKE_DIR "/fake_nccl_ok.so", NULL, 0, &lib, &err) == MLU_OK);
    CHECK(lib.handle != NULL);
    CHECK(lib.version == 22103);
    CHECK_STR(lib.path, FAKE_DIR "/fake_nccl_ok.so");
    CHECK(lib.api.AllReduce != NULL && lib.api.GroupEnd != NULL);
    CHECK(lib.api.GetLastError != NULL && lib.api.CommInitRankConfig != NULL);
    CHECK(mlu_nccl_unique_id_new(&lib, &a, &err) == MLU_OK);
    CHECK(mlu_nccl_unique_id_new(&lib, &b, &err) == MLU_OK);
    for (i = 1; i < MLU_NCCL_UNIQUE_ID_BYTES; i++)
        pattern_ok &= a.internal[i] == (char)(i ^ 0x5a);
    CHECK(pattern_ok);
    CHECK(a.internal[0] != b.internal[0]);
    /* an NCCL failure carries NCCL's own text and the last error */
    mlu_error_clear(&err);
    CHECK(mlu_nccl_fail(&lib, NULL, "ncclAllReduce", 3, &err) == MLU_EDEVICE);
    CHECK(strstr(err.text, "ncclAllReduce failed") != NULL);
    CHECK(strstr(err.text, "fake internal error") != NULL);
    CHECK(strstr(err.text, "fake last error") != NULL);
    CHECK(mlu_nccl_dtype_supported(&lib, MLU_NCCL_BFLOAT16));
    CHECK(!mlu_nccl_dtype_supported(&lib, MLU_NCCL_FLOAT8E4M3)); /* 2.21 < 2.24 */
    CHECK(!mlu_nccl_dtype_supported(&lib, MLU_NCCL_DTYPE_COUNT));
    CHECK(!mlu_nccl_dtype_supported(&lib, -1));
    mlu_nccl_close(&lib);
    CHECK(lib.handle == NULL);
    mlu_nccl_close(&lib); /* twice is fine */
}

static void test_explicit_directory(void)
{
    mlu_nccl_lib lib;
    mlu_error err;

    CHECK(open_with(FAKE_DIR "/wheel_fp8", NULL, 0, &lib, &err) == MLU_OK);
    CHECK_STR(lib.path, FAKE_DIR "/wheel_fp8/libnccl.so.2");
    CHECK(lib.version == 22403);
    CHECK(mlu_nccl_dtype_supported(&lib, MLU_NCCL_FLOAT8E5M2));
    mlu_nccl_close(&lib);
}

static void test_too_old_is_refused(void)
{
    mlu_nccl_lib lib;
    mlu_error err;

    CHECK(open_with(FAKE_DIR "/fake_nccl_old.so", NULL, 0, &lib, &err) == MLU_ENOTSUP);
    CHECK(lib.handle == NULL);
    CHECK(err.code == MLU_ENOTSUP);
    CHECK(strstr(report, "NCCL 2.17.3 is too old") != NULL);
    CHECK(strstr(report, "2.18.0 or later") != NULL);
}

static void test_missing_symbol(void)
{
    mlu_nccl_lib lib;
    mlu_error err;

    CHECK(open_with(FAKE_DIR "/fake_nccl_nosym.so", NULL, 0, &lib, &err) == MLU_ENOTSUP);
    CHECK(strstr(report, "lacks the required symbol ncclAllReduce") != NULL);
    CHECK(lib.api.GetVersion == NULL); /* nothing half-filled */
}

static void test_optional_symbol_may_be_missing(void)
{
    mlu_nccl_lib lib;
    mlu_error err;

    CHECK(open_with(FAKE_DIR "/fake_nccl_nolast.so", NULL, 0, &lib, &err) == MLU_OK);
    CHECK(lib.api.GetLastError == NULL);
    CHECK(mlu_nccl_fail(&lib, NULL, "ncclBroadcast", 3, &err) == MLU_EDEVICE);
    CHECK(strstr(err.text, "ncclBroadcast failed (NCCL result 3): fake internal error") != NULL);
    mlu_nccl_close(&lib);
}

static void test_explicit_path_does_not_fall_through(void)
{
    mlu_nccl_lib lib;
    mlu_error err;
    const char *dirs[] = {FAKE_DIR "/wheel"};

    CHECK(open_with("/nonexistent/libnccl.so.2", dirs, 1, &lib, &err) == MLU_ENOTSUP);
    CHECK(strstr(report, "MLUTILS_NCCL_PATH: /nonexistent/libnccl.so.2: not found") != NULL);
    CHECK(strstr(report, "pip wheel") == NULL);
    /* a file that is not a shared object: dlopen's own reason is kept */
    CHECK(open_with(FAKE_DIR "/../fake_nccl.c", NULL, 0, &lib, &err) == MLU_ENOTSUP);
    CHECK(strstr(report, "fake_nccl.c: ") != NULL);
}

static void test_wheel_dirs_in_order(void)
{
    mlu_nccl_lib lib;
    mlu_error err;
    const char *dirs[] = {"/nonexistent-wheel", FAKE_DIR "/wheel", FAKE_DIR "/wheel_fp8"};

    CHECK(open_with(NULL, dirs, 3, &lib, &err) == MLU_OK);
    CHECK_STR(lib.path, FAKE_DIR "/wheel/libnccl.so.2");
    CHECK(strstr(report, "pip wheel: /nonexistent-wheel/libnccl.so.2: not found") != NULL);
    mlu_nccl_close(&lib);
}

static void test_report_names_every_place(void)
{
    mlu_nccl_lib lib;
    mlu_error err;
    const char *dirs[] = {"/nonexistent-wheel"};
    mlu_status st;

    setenv("CUDA_HOME", "/nonexistent-cuda-home", 1);
    unsetenv("CUDA_PATH");
    st = open_with(NULL, dirs, 1, &lib, &err);
    if (st == MLU_OK) {
        /* this machine has a real NCCL on its system path or in /usr/local/cuda */
        CHECK(strstr(report, "/nonexistent-wheel/libnccl.so.2: not found") != NULL);
        mlu_nccl_close(&lib);
    } else {
        CHECK(strstr(report, "already in this process: none loaded") != NULL);
        CHECK(strstr(report, "pip wheel: /nonexistent-wheel/libnccl.so.2: not found") != NULL);
        CHECK(strstr(report, "CUDA_HOME: /nonexistent-cuda-home/lib64/libnccl.so.2: not found") != NULL);
        CHECK(strstr(report, "CUDA install: /usr/local/cuda/lib64/libnccl.so.2") != NULL);
        CHECK(strstr(report, "system library path: libnccl.so.2") != NULL);
        CHECK(strstr(err.text, "could not be loaded") != NULL);
    }
    unsetenv("CUDA_HOME");
}

static void test_small_report_is_cut_safely(void)
{
    mlu_nccl_lib lib;
    mlu_error err;
    char small[16];

    memset(small, 'x', sizeof(small));
    setenv("MLUTILS_NCCL_PATH", FAKE_DIR "/fake_nccl_old.so", 1);
    mlu_error_clear(&err);
    CHECK(mlu_nccl_open(&lib, NULL, 0, small, sizeof(small), &err) == MLU_ENOTSUP);
    CHECK(memchr(small, '\0', sizeof(small)) != NULL);
    CHECK(strlen(small) == sizeof(small) - 1);
    mlu_error_clear(&err);
    CHECK(mlu_nccl_open(&lib, NULL, 0, NULL, 0, &err) == MLU_ENOTSUP);
}

static void test_version_text(void)
{
    char buf[32];

    mlu_nccl_version_text(22103, buf, sizeof(buf));
    CHECK_STR(buf, "2.21.3");
    mlu_nccl_version_text(23203, buf, sizeof(buf));
    CHECK_STR(buf, "2.32.3");
    mlu_nccl_version_text(2708, buf, sizeof(buf)); /* the old encoding */
    CHECK_STR(buf, "2.7.8");
}

/* Every data type and reduction has a name, and no two share one. */
static void test_names(void)
{
    int i, j;

    for (i = 0; i < MLU_NCCL_DTYPE_COUNT; i++) {
        CHECK(mlu_nccl_dtype_names[i] != NULL);
        for (j = 0; j < i && mlu_nccl_dtype_names[i] != NULL; j++)
            CHECK(strcmp(mlu_nccl_dtype_names[i], mlu_nccl_dtype_names[j]) != 0);
    }
    for (i = 0; i < MLU_NCCL_OP_COUNT; i++) {
        CHECK(mlu_nccl_op_names[i] != NULL);
        for (j = 0; j < i && mlu_nccl_op_names[i] != NULL; j++)
            CHECK(strcmp(mlu_nccl_op_names[i], mlu_nccl_op_names[j]) != 0);
    }
    CHECK_STR(mlu_nccl_dtype_names[MLU_NCCL_FLOAT32], "float32");
    CHECK_STR(mlu_nccl_op_names[MLU_NCCL_AVG], "avg");
}

int main(void)
{
    test_explicit_file();
    test_explicit_directory();
    test_too_old_is_refused();
    test_missing_symbol();
    test_optional_symbol_may_be_missing();
    test_explicit_path_does_not_fall_through();
    test_wheel_dirs_in_order();
    test_report_names_every_place();
    test_small_report_is_cut_safely();
    test_version_text();
    test_names();
    unsetenv("MLUTILS_NCCL_PATH");
    return TEST_DONE("test_nccl_loader");
}
