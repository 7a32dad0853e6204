/* pt_write.c: fuzz harness for the .pt format writer (core/ptwrite.c).
 *
 * The input is a program: its bytes choose values (None, bools, ints,
 * floats, strings, lists, dicts, OrderedDicts, tuples, memo repeats, tensors
 * of any dtype on new or shared storages, with conj/neg flags, parameters),
 * batch-sized containers, the archive name and the zip64 threshold.  The
 * writer builds the archive into a buffer of mlu_ptw_archive_bound bytes;
 * then the zip reader must find every record in order, 64-byte aligned, with
 * good CRCs, and (at torch's own zip64 threshold) the checkpoint reader must
 * load it with every tensor and storage, the flagged tensors flagged.  Run a
 * second time with one allocation failing (fuzz_oom.h): only MLU_ENOMEM,
 * with a message, and no leaks. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/alloc.h"
#include "core/ptload_file.h"
#include "core/ptwrite.h"
#include "fuzz_oom.h"

#define MAX_DEPTH 8
#define MAX_MEMO 64

typedef struct prog {
    const uint8_t *p;
    size_t n, i;
    uint32_t memo[MAX_MEMO];   /* memo indexes of finished values a repeat may name */
    size_t nmemo;
    uint32_t pid[MLU_PTW_PID_COUNT];
    size_t tensors;            /* tensor records the reader will make */
    size_t flagged;            /* those of them with conj/neg flags */
    size_t values;             /* cap on the values one input makes */
    uint64_t limit;            /* the zip64 threshold of this archive */
} prog;

static unsigned byte(prog *g)
{
    return g->i < g->n ? g->p[g->i++] : 0;
}

static uint64_t u64(prog *g)
{
    uint64_t v = 0;
    int k;
    for (k = 0; k < 8; k++)
        v = (v << 8) | byte(g);
    return v;
}

static void remember(prog *g, uint32_t m)
{
    if (m != MLU_PTW_NO_MEMO)
        g->memo[g->nmemo++ % MAX_MEMO] = m;
}

static mlu_status value(mlu_ptw *w, prog *g, int depth, mlu_error *err);

static mlu_status tensor(mlu_ptw *w, prog *g, mlu_error *err)
{
    int64_t shape[3], stride[3];
    mlu_ptw_tensor t;
    uint32_t m = 0;
    unsigned flags = byte(g);
    int param = (flags & 4) != 0;
    mlu_status st = MLU_OK;
    const char *keys[2];
    size_t k, nk = 0, j;

    memset(&t, 0, sizeof(t));
    t.shape = shape;
    t.stride = stride;
    t.requires_grad = (flags & 8) != 0;
    if ((flags & 1) && w->nst > 0) {
        /* another view of a storage met before, typed as it is: all of it, 1-d */
        t.storage = byte(g) % w->nst;
        t.dtype = w->st[t.storage].dtype;
        t.ndim = 1;
        shape[0] = (int64_t)(w->st[t.storage].nbytes / (uint64_t)mlu_torch_dtypes[t.dtype].itemsize);
        stride[0] = 1;
    } else {
        uint64_t extent = 1, es;
        t.dtype = (int)(byte(g) % (unsigned)MLU_TORCH_N_DTYPES);
        es = (uint64_t)mlu_torch_dtypes[t.dtype].itemsize;
        t.ndim = byte(g) % 4;
        t.offset = byte(g) % 3;
        for (k = t.ndim; k-- > 0;) {
            shape[k] = byte(g) % 4;
            stride[k] = (int64_t)extent * (1 + (flags >> 4) % 2);
            extent += (uint64_t)(shape[k] > 0 ? shape[k] - 1 : 0) * (uint64_t)stride[k];
        }
        for (k = 0; k < t.ndim; k++)
            if (shape[k] == 0)
                extent = 0;
        st = mlu_ptw_storage_add(w, t.dtype, ((uint64_t)t.offset + extent) * es, NULL, &t.storage, err);
    }
    if (st == MLU_OK)
        st = mlu_ptw_storage_check(w, t.storage, t.dtype, w->st[t.storage].nbytes, err);
    if (!mlu_torch_dtype_can_require_grad(t.dtype))  /* the reader refuses the rest, as torch does */
        t.requires_grad = 0;
    /* tensor metadata: the flags torch writes ('conj' on a complex dtype,
     * 'neg' on one torch can negate, or both), which the checkpoint reader
     * loads; on other dtypes a key it refuses, so only in archives that only
     * the zip reader checks */
    if (flags & 2) {
        if (mlu_torch_dtype_is_complex(t.dtype)) {
            keys[nk++] = "conj";
            t.flags |= MLU_PT_FLAG_CONJ;
        }
        if (mlu_torch_dtype_can_negate(t.dtype) && (nk == 0 || (flags & 32))) {
            keys[nk++] = "neg";
            t.flags |= MLU_PT_FLAG_NEG;
        }
        if (nk == 0 && g->limit != MLU_ZIP64_LIMIT)
            keys[nk++] = "k";
    }
    if (st == MLU_OK && param)
        st = mlu_ptw_param_begin(w, err);
    if (st == MLU_OK) {
        /* the caller's memo knows 'storage' and 'cpu' once written; keys are new objects */
        uint32_t pid[MLU_PTW_PID_COUNT];
        memcpy(pid, g->pid, sizeof(pid));
        pid[MLU_PTW_PID_KEY] = MLU_PTW_NO_MEMO;
        st = mlu_ptw_tensor_begin(w, &t, pid, err);
        g->pid[MLU_PTW_PID_STORAGE] = pid[MLU_PTW_PID_STORAGE];
        g->pid[MLU_PTW_PID_CPU] = pid[MLU_PTW_PID_CPU];
    }
    if (st == MLU_OK && nk > 0) {
        mlu_ptw_seq seq;
        uint32_t dm;
        st = mlu_ptw_dict_begin(w, &seq, nk, &dm, err);
        for (j = 0; j < nk && st == MLU_OK; j++) {
            st = mlu_ptw_item(w, &seq, err);
            if (st == MLU_OK)
                st = mlu_ptw_str(w, keys[j], strlen(keys[j]), &dm, err);
            if (st == MLU_OK)
                st = mlu_ptw_bool(w, 1, err);
        }
        if (st == MLU_OK)
            st = mlu_ptw_seq_end(w, &seq, NULL, err);
    }
    if (st == MLU_OK)
        st = mlu_ptw_tensor_end(w, &m, err);
    if (st == MLU_OK && param)
        st = mlu_ptw_param_end(w, t.requires_grad, &m, err);
    if (st == MLU_OK) {
        g->tensors += param ? 2 : 1; /* the reader records a parameter as a second tensor */
        g->flagged += t.flags != 0 ? (param ? 2u : 1u) : 0u;
        remember(g, m);
    }
    return st;
}

static mlu_status container(mlu_ptw *w, prog *g, int kind, int depth, mlu_error *err)
{
    mlu_ptw_seq seq;
    size_t n = byte(g) % 6, i;
    uint32_t m = MLU_PTW_NO_MEMO;
    mlu_status st;

    if (n == 5 && byte(g) == 0xFF)
        n = 999 + byte(g) % 4; /* across a batch boundary */
    if (kind == 0)
        st = mlu_ptw_list_begin(w, &seq, n, &m, err);
    else if (kind == 1)
        st = mlu_ptw_dict_begin(w, &seq, n, &m, err);
    else if (kind == 2)
        st = mlu_ptw_odict_begin(w, &seq, n, &m, err);
    else
        st = mlu_ptw_tuple_begin(w, &seq, n, err);
    for (i = 0; i < n && st == MLU_OK; i++) {
        st = mlu_ptw_item(w, &seq, err);
        if (n > 5) { /* the big ones hold plain ints */
            if (st == MLU_OK && kind != 0 && kind != 3)
                st = mlu_ptw_int(w, (int64_t)i, err);
            if (st == MLU_OK)
                st = mlu_ptw_int(w, -(int64_t)i, err);
            continue;
        }
        if (st == MLU_OK && (kind == 1 || kind == 2))
            st = value(w, g, depth + 1, err);
        if (st == MLU_OK)
            st = value(w, g, depth + 1, err);
    }
    if (st == MLU_OK)
        st = mlu_ptw_seq_end(w, &seq, kind == 3 ? &m : NULL, err);
    if (st == MLU_OK && kind == 2 && (byte(g) & 1)) {
        /* attributes: {"_metadata": {}} then BUILD */
        mlu_ptw_seq a, b;
        uint32_t am;
        st = mlu_ptw_dict_begin(w, &a, 1, &am, err);
        if (st == MLU_OK)
            st = mlu_ptw_item(w, &a, err);
        if (st == MLU_OK)
            st = mlu_ptw_str(w, "_metadata", 9, &am, err);
        if (st == MLU_OK)
            st = mlu_ptw_dict_begin(w, &b, 0, &am, err);
        if (st == MLU_OK)
            st = mlu_ptw_seq_end(w, &b, NULL, err);
        if (st == MLU_OK)
            st = mlu_ptw_seq_end(w, &a, NULL, err);
        if (st == MLU_OK)
            st = mlu_ptw_odict_state(w, err);
    }
    /* only finished containers are repeated: no cycles */
    if (st == MLU_OK)
        remember(g, m);
    return st;
}

static mlu_status value(mlu_ptw *w, prog *g, int depth, mlu_error *err)
{
    unsigned op = byte(g) % 11;
    uint32_t m;
    char s[64];
    size_t n, k;

    if (++g->values > 400 || g->i >= g->n)
        op = 0;
    if (depth >= MAX_DEPTH && op >= 5 && op <= 8)
        op = 2;
    switch (op) {
    case 0:
        return mlu_ptw_none(w, err);
    case 1:
        return mlu_ptw_bool(w, (int)(byte(g) & 1), err);
    case 2:
        return mlu_ptw_int(w, (int64_t)u64(g) >> (byte(g) % 64), err);
    case 3: {
        uint64_t bits = u64(g);
        double d;
        memcpy(&d, &bits, sizeof(d));
        return mlu_ptw_float(w, d, err);
    }
    case 4:
        n = byte(g) % sizeof(s);
        for (k = 0; k < n; k++)
            s[k] = (char)(0x20 + byte(g) % 0x5F);
        {
            mlu_status st = mlu_ptw_str(w, s, n, &m, err);
            if (st == MLU_OK)
                remember(g, m);
            return st;
        }
    case 5:
    case 6:
    case 7:
    case 8:
        return container(w, g, (int)op - 5, depth, err);
    case 9:
        return tensor(w, g, err);
    default:
        if (g->nmemo == 0)
            return mlu_ptw_none(w, err);
        return mlu_ptw_get(w, g->memo[byte(g) % (g->nmemo < MAX_MEMO ? g->nmemo : MAX_MEMO)], err);
    }
}

#define FAIL(...) (fprintf(stderr, "pt_write: " __VA_ARGS__), fputc('\n', stderr), abort())

static void check_archive(const prog *g, const mlu_ptw *w, const char *archive, uint64_t limit,
                          const uint8_t *zip, size_t len)
{
    mlu_rd rd;
    mlu_zip z;
    mlu_pt pt;
    mlu_error err;
    size_t i, n;

    mlu_error_clear(&err);
    mlu_rd_mem(&rd, zip, len);
    if (mlu_zip_open(&z, &rd, &err) != MLU_OK) {
        fprintf(stderr, "pt_write: the zip reader refuses the archive: %s\n", err.text);
        abort();
    }
    if (z.count != w->nst + 6)
        FAIL("%zu records for %zu storages", z.count, w->nst);
    for (i = 0; i < z.count; i++) {
        const mlu_zip_entry *e = &z.entries[i];
        if (e->data_offset % 64 != 0 || e->method != 0 || e->csize != e->usize
            || e->name_len <= strlen(archive) || memcmp(e->name, archive, strlen(archive)) != 0)
            FAIL("record %zu: misplaced, compressed or misnamed", i);
        if (i >= 4 && i < 4 + w->nst && e->usize != w->st[i - 4].nbytes)
            FAIL("record %zu: %llu bytes", i, (unsigned long long)e->usize);
        if (mlu_zip_check(&z, e, &err) != MLU_OK)
            FAIL("record %zu: %s", i, err.text);
    }
    mlu_zip_close(&z);
    if (limit != MLU_ZIP64_LIMIT)
        return; /* torch's computed offsets assume its own threshold */
    if (mlu_pt_open(&pt, &rd, 1, &err) != MLU_OK) {
        fprintf(stderr, "pt_write: the checkpoint reader refuses the archive: %s\n", err.text);
        abort();
    }
    if (pt.vm.n_tensors != g->tensors)
        FAIL("%u tensors read, %zu written", pt.vm.n_tensors, g->tensors);
    for (i = 0, n = 0; i < pt.vm.n_tensors; i++)
        n += pt.vm.tensors[i].flags != 0;
    if (n != g->flagged)
        FAIL("%zu flagged tensors read, %zu written", n, g->flagged);
    mlu_pt_close(&pt);
}

static void run(const uint8_t *data, size_t size, int reliable)
{
    prog g;
    mlu_ptw w;
    mlu_error err;
    mlu_ptw_memsink mem = {NULL, 0, 0};
    char archive[24];
    uint64_t limit;
    size_t bound = 0, n, k;
    mlu_status st;

    memset(&g, 0, sizeof(g));
    g.p = data;
    g.n = size;
    for (k = 0; k < MLU_PTW_PID_COUNT; k++)
        g.pid[k] = MLU_PTW_NO_MEMO;
    n = 1 + byte(&g) % 20;
    for (k = 0; k < n; k++)
        archive[k] = (char)('a' + byte(&g) % 26);
    archive[n] = '\0';
    limit = byte(&g) % 4 == 0 ? 1 + (uint64_t)byte(&g) * 97 : MLU_ZIP64_LIMIT;
    g.limit = limit;
    mlu_error_clear(&err);
    st = mlu_ptw_init(&w, &err);
    if (st == MLU_OK)
        st = value(&w, &g, 0, &err);
    if (st == MLU_OK)
        st = mlu_ptw_pickle_end(&w, &err);
    if (st == MLU_OK)
        st = mlu_ptw_archive_bound(&w, strlen(archive), &bound, &err);
    if (st == MLU_OK) {
        mem.p = mlu_malloc(bound);
        mem.cap = bound;
        if (mem.p == NULL)
            st = mlu_error_set(&err, MLU_ENOMEM, -1, "out of memory");
        else
            memset(mem.p, 0, bound);
    }
    if (st == MLU_OK) {
        /* storages were added without bytes: every one is a repeating pattern */
        for (k = 0; k < w.nst && st == MLU_OK; k++) {
            uint8_t *b = mlu_malloc(w.st[k].nbytes ? (size_t)w.st[k].nbytes : 1);
            if (b == NULL) {
                st = mlu_error_set(&err, MLU_ENOMEM, -1, "out of memory");
                break;
            }
            memset(b, (int)(k * 37 + 1), (size_t)w.st[k].nbytes);
            w.st[k].data = b;
        }
    }
    if (st == MLU_OK)
        st = mlu_ptw_archive_write(&w, archive, mlu_ptw_sink_mem, &mem, limit, NULL, NULL, &err);
    if (st != MLU_OK) {
        /* nothing here may be refused but for memory, and a refusal says why */
        if (reliable || st != MLU_ENOMEM || err.text[0] == '\0') {
            fprintf(stderr, "pt_write: %s: %s\n", mlu_status_name(st), err.text);
            abort();
        }
    } else if (reliable) {
        check_archive(&g, &w, archive, limit, (const uint8_t *)mem.p, mem.len);
    }
    for (k = 0; k < w.nst; k++)
        mlu_free((void *)w.st[k].data);
    mlu_free(mem.p);
    mlu_ptw_free(&w);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    FUZZ_WITH_OOM(run, data, size);
    return 0;
}

#include "pt_replay.h"
