/* pt_pickle.c: fuzz harness for the restricted pickle VM (zip-style and
 * legacy persistent ids) and the legacy pickle-stream reader. */
#include <stdint.h>
#include <string.h>

#include "core/pickle_read.h"
#include "core/ptload_file.h"
#include "fuzz_oom.h"

static void run(const uint8_t *data, size_t size, int reliable)
{
    int legacy;
    mlu_error err;
    mlu_pt pt;

    for (legacy = 0; legacy < 2; legacy++) {
        mlu_pk_vm vm;
        size_t pos = 0;
        uint32_t root;
        int runs = 0;
        mlu_pk_vm_init(&vm);
        /* a sequence of pickles, as the legacy format has */
        while (pos < size && runs++ < 8) {
            mlu_error_clear(&err);
            if (mlu_pk_run(&vm, data, size, &pos, legacy, &root, &err) != MLU_OK)
                break;
            if (root >= vm.n_nodes)
                __builtin_trap();
        }
        mlu_error_clear(&err);
        (void)mlu_pk_finish(&vm, &err);
        mlu_pk_vm_free(&vm);
    }
    mlu_error_clear(&err);
    {
        mlu_rd rd;
        mlu_rd_mem(&rd, data, size);
        if (mlu_pt_open(&pt, &rd, 1, &err) == MLU_OK)
            mlu_pt_close(&pt);
    }
    (void)reliable;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    FUZZ_WITH_OOM(run, data, size);
    return 0;
}

#include "pt_replay.h"
