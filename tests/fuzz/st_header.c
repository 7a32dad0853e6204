/* st_header.c: fuzz target for the safetensors header parser.
 *
 * libFuzzer:  make fuzz-st-libfuzzer   (clang, -DMLU_LIBFUZZER, every core source)
 * replay:     make fuzz-replay-st   (gcc + ASan/UBSan over tests/fuzz/corpus_st_header/)
 *
 * Besides not crashing, an accepted input must satisfy the layout the
 * parser promises, and writing its header back and parsing that again must
 * give the same tensors. */
#define _GNU_SOURCE
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "core/alloc.h"
#include "core/buf.h"
#include "core/safetensors.h"
#include "fuzz_oom.h"

static void check_accepted(const uint8_t *data, size_t size, const mlu_st_header *h)
{
    uint64_t end = 0;
    size_t i;
    mlu_st_entry *entries = NULL;
    mlu_st_kv *meta = NULL;
    mlu_buf out = MLU_BUF_INIT;
    uint64_t data_len = 0;
    mlu_error err;
    mlu_st_header again;
    uint8_t *file = NULL;

    for (i = 0; i < h->ntensors; i++) {
        if (h->tensors[i].begin != end || h->tensors[i].end < h->tensors[i].begin)
            abort();
        end = h->tensors[i].end;
    }
    if (h->data_start + end != size)
        abort();
    entries = mlu_calloc(h->ntensors, sizeof(*entries));
    meta = mlu_calloc(h->nmeta, sizeof(*meta));
    if (entries == NULL || meta == NULL)
        goto done;
    for (i = 0; i < h->ntensors; i++) {
        const mlu_st_tensor *t = &h->tensors[i];
        entries[i].name = t->name;
        entries[i].name_len = t->name_len;
        entries[i].dtype = t->dtype;
        entries[i].ndim = t->ndim;
        entries[i].shape = t->shape;
        entries[i].data = data + h->data_start + t->begin;
        entries[i].nbytes = t->end - t->begin;
    }
    for (i = 0; i < h->nmeta; i++) {
        meta[i].key = h->meta[i].key;
        meta[i].key_len = h->meta[i].key_len;
        meta[i].value = h->meta[i].value;
        meta[i].value_len = h->meta[i].value_len;
    }
    mlu_error_clear(&err);
    if (mlu_st_build_header(entries, h->ntensors, meta, h->nmeta, h->has_metadata, &out, &data_len,
                            &err) != MLU_OK) {
        /* only a reserved name, or a shape no array can hold (mlu_st_array_shape),
         * could make it refuse */
        if (err.code != MLU_ENOMEM && err.code != MLU_EINVAL)
            abort();
        goto done;
    }
    if (data_len != end)
        abort();
    file = mlu_malloc(out.len + (size_t)data_len);
    if (file == NULL)
        goto done;
    memcpy(file, out.data, out.len);
    {
        size_t off = out.len;
        for (i = 0; i < h->ntensors; i++) {
            memcpy(file + off, entries[i].data, (size_t)entries[i].nbytes);
            off += (size_t)entries[i].nbytes;
        }
    }
    mlu_error_clear(&err);
    if (mlu_st_parse(file, out.len + data_len, &again, &err) != MLU_OK) {
        if (err.code != MLU_ENOMEM)
            abort();
        goto done;
    }
    if (again.ntensors != h->ntensors || again.nmeta != h->nmeta)
        abort();
    mlu_st_header_free(&again);
done:
    mlu_free(file);
    mlu_buf_free(&out);
    mlu_free(entries);
    mlu_free(meta);
}

static void run(const uint8_t *data, size_t size, int reliable)
{
    mlu_st_header h;
    mlu_error err;

    mlu_error_clear(&err);
    if (mlu_st_parse(data, size, &h, &err) == MLU_OK) {
        check_accepted(data, size, &h);
        mlu_st_header_free(&h);
    } else if (err.code != MLU_EFORMAT && err.code != MLU_ENOMEM) {
        abort();
    } else if (err.text[0] == '\0') {
        abort(); /* every refusal says why */
    }
    (void)reliable;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
#ifdef MLU_LIBFUZZER
    FUZZ_WITH_OOM(run, data, size);
#else
    run(data, size, 1); /* the replay main below fails allocations itself */
#endif
    return 0;
}

#ifndef MLU_LIBFUZZER
static int replay_file(const char *path)
{
    FILE *f = fopen(path, "rb");
    uint8_t *buf = NULL;
    long n;

    if (f == NULL)
        return -1;
    if (fseek(f, 0, SEEK_END) != 0 || (n = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0) {
        fclose(f);
        return -1;
    }
    /* exactly n bytes, so ASan sees any read past the input */
    buf = malloc(n > 0 ? (size_t)n : 1);
    if (buf == NULL || (n > 0 && fread(buf, 1, (size_t)n, f) != (size_t)n)) {
        free(buf);
        fclose(f);
        return -1;
    }
    fclose(f);
    LLVMFuzzerTestOneInput(buf, (size_t)n);
    free(buf);
    return 0;
}

static int replay_all(int argc, char **argv)
{
    int i, count = 0;

    for (i = 1; i < argc; i++) {
        struct stat sb;
        if (stat(argv[i], &sb) == 0 && S_ISDIR(sb.st_mode)) {
            DIR *d = opendir(argv[i]);
            struct dirent *e;
            if (d == NULL)
                return -1;
            while ((e = readdir(d)) != NULL) {
                char path[4096];
                if (e->d_name[0] == '.')
                    continue;
                snprintf(path, sizeof(path), "%s/%s", argv[i], e->d_name);
                if (replay_file(path) != 0) {
                    fprintf(stderr, "cannot read %s\n", path);
                    closedir(d);
                    return -1;
                }
                count++;
            }
            closedir(d);
        } else {
            if (replay_file(argv[i]) != 0) {
                fprintf(stderr, "cannot read %s\n", argv[i]);
                return -1;
            }
            count++;
        }
    }
    return count;
}

int main(int argc, char **argv)
{
    int count = replay_all(argc, argv);
    long k;

    if (count < 0)
        return 2;
    /* again with the kth allocation failing, for the first few k */
    for (k = 0; k < 8; k++) {
        mlu_alloc_fail_after(k);
        replay_all(argc, argv);
    }
    mlu_alloc_fail_after(-1);
    printf("st_header: replayed %d inputs\n", count);
    return count > 0 ? 0 : 1;
}
#endif
