/* pt_zip.c: fuzz harness for the zip directory reader and the checkpoint
 * resolver (zip64, stored and capped deflate records, record lookups), from
 * memory and from a file read with pread (intact, and cut after fstat). */
#define _DEFAULT_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "core/alloc.h"
#include "core/ptload_file.h"
#include "fuzz_oom.h"
#include "core/zipread.h"

/* The same input read from a file with pread: once intact, once cut to half
 * after the size was taken (a file truncated by another process). */
static void from_file(const uint8_t *data, size_t size)
{
    static FILE *f = NULL;
    int fd, pass;

    if (f == NULL && (f = tmpfile()) == NULL)
        return;
    fd = fileno(f);
    if (ftruncate(fd, 0) != 0 || (size > 0 && pwrite(fd, data, size, 0) != (ssize_t)size))
        return;
    for (pass = 0; pass < 2; pass++) {
        mlu_rd rd;
        mlu_pt pt;
        mlu_error err;
        mlu_rd_fd(&rd, fd, size);
        if (pass == 1 && ftruncate(fd, (off_t)(size / 2)) != 0)
            return;
        mlu_error_clear(&err);
        if (mlu_pt_open(&pt, &rd, 1, &err) == MLU_OK) {
            uint32_t s;
            for (s = 0; s < pt.vm.n_storages; s++) {
                uint64_t n = pt.vm.storages[s].nbytes;
                uint8_t *buf = n <= (1u << 20) ? mlu_malloc(n ? (size_t)n : 1) : NULL;
                if (buf != NULL) {
                    mlu_error_clear(&err);
                    (void)mlu_pt_storage_fill(&pt, s, buf, &err);
                    mlu_free(buf);
                }
            }
            mlu_pt_close(&pt);
        }
    }
}

static void run(const uint8_t *data, size_t size, int reliable)
{
    mlu_zip z;
    mlu_pt pt;
    mlu_error err;
    mlu_rd rd;
    size_t i;

    mlu_error_clear(&err);
    mlu_rd_mem(&rd, data, size);
    if (mlu_zip_open(&z, &rd, &err) == MLU_OK) {
        for (i = 0; i < z.count; i++) {
            const mlu_zip_entry *e = &z.entries[i];
            mlu_error_clear(&err);
            (void)mlu_zip_find(&z, e->name, e->name_len);
            if (e->usize <= (1u << 20)) {
                uint8_t *buf = mlu_malloc(e->usize ? (size_t)e->usize : 1);
                if (buf != NULL) {
                    (void)mlu_zip_extract(&z, e, buf, &err);
                    mlu_free(buf);
                }
            } else {
                (void)mlu_zip_check(&z, e, &err);
            }
        }
        mlu_zip_close(&z);
    }
    mlu_error_clear(&err);
    if (mlu_pt_open(&pt, &rd, 1, &err) == MLU_OK) {
        uint32_t s;
        for (s = 0; s < pt.vm.n_storages; s++) {
            uint64_t n = pt.vm.storages[s].nbytes;
            if (n <= (1u << 20)) {
                uint8_t *buf = mlu_malloc(n ? (size_t)n : 1);
                if (buf != NULL) {
                    mlu_error_clear(&err);
                    (void)mlu_pt_storage_fill(&pt, s, buf, &err);
                    mlu_free(buf);
                }
            }
        }
        mlu_pt_close(&pt);
    }
    from_file(data, size);
    (void)reliable;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    FUZZ_WITH_OOM(run, data, size);
    return 0;
}

#include "pt_replay.h"
