/* ptload_file.c: PyTorch checkpoint structure (see ptload_file.h). */
#define _DEFAULT_SOURCE
#include "ptload_file.h"
#include "alloc.h"
#include "bytes.h"
#include "pickle_ops.h"
#include "zipfmt.h"
#include "zipwrite.h"

#include <stdlib.h>
#include <string.h>

#define MAX_RECORD_NAME 4096
#define MAX_VERSION 0xA

static const uint8_t legacy_magic[10] = {0x6C, 0xFC, 0x9C, 0x46, 0xF9, 0x20, 0x6A, 0xA8, 0x50, 0x19};

/* Finds prefix + "/" + rest. */
static const mlu_zip_entry *find_record(const mlu_pt *pt, const char *prefix, size_t pl, const char *rest, size_t rl)
{
    char name[MAX_RECORD_NAME];
    if (pl + 1 + rl > sizeof(name))
        return NULL;
    memcpy(name, prefix, pl);
    name[pl] = '/';
    memcpy(name + pl + 1, rest, rl);
    return mlu_zip_find(&pt->zip, name, pl + 1 + rl);
}

/* Small text record (version, byteorder) into buf (NUL-terminated). */
static mlu_status small_record(const mlu_pt *pt, const mlu_zip_entry *e, char *buf, size_t cap, mlu_error *err)
{
    mlu_status st;

    if (e->usize >= cap) {
        st = mlu_error_set(err, MLU_EFORMAT, (int64_t)e->lfh_offset, "record '%.*s' is too large (%llu bytes)",
                           (int)e->name_len, e->name, (unsigned long long)e->usize);
        goto done;
    }
    if ((st = mlu_zip_extract(&pt->zip, e, (uint8_t *)buf, err)) != MLU_OK)
        goto done;
    buf[e->usize] = '\0';
done:
    return st;
}

static int parse_version(const char *s, unsigned long *out)
{
    unsigned long v = 0;
    size_t i = 0;
    if (s[0] < '0' || s[0] > '9')
        return -1;
    for (; s[i] >= '0' && s[i] <= '9'; i++) {
        v = v * 10 + (unsigned long)(s[i] - '0');
        if (v > 1000000)
            return -1;
    }
    for (; s[i] == '\n' || s[i] == '\r' || s[i] == ' '; i++)
        ;
    if (s[i] != '\0')
        return -1;
    *out = v;
    return 0;
}

typedef struct first_use {
    size_t at;     /* byte offset of the storage's first persistent id */
    uint32_t idx;  /* storage index */
} first_use;

static int cmp_first_use(const void *a, const void *b)
{
    const first_use *x = a, *y = b;
    return x->at < y->at ? -1 : x->at > y->at;
}

/* torch >= 2.7 with calculate_storage_offsets (used by mmap=True and meta
 * loads) does not look data/1.. up: on a file with .format_version >= "1" it
 * computes each record's offset from data/0's, in first-use order, assuming
 * torch's own layout (local header, padding to .storage_alignment, 16- or
 * 24-byte descriptor).  A file whose records lie elsewhere loads differently
 * there (another tensor's bytes, silently), so verify() refuses it. */
static mlu_status check_computed_offsets(mlu_pt *pt, const char *prefix, size_t pl, mlu_error *err)
{
    mlu_status st = MLU_OK;
    const mlu_zip_entry *fv, *al;
    first_use *order = NULL;  /* owned */
    unsigned long align = 64;
    uint64_t cur = 0, lfh;
    char small[64];
    uint32_t i;

    fv = find_record(pt, prefix, pl, ".format_version", 15);
    if (fv == NULL || pt->vm.n_storages == 0)
        goto done;
    if ((st = small_record(pt, fv, small, sizeof(small), err)) != MLU_OK)
        goto done;
    if (strcmp(small, "1") < 0)  /* torch compares the bytes with b"1" */
        goto done;
    al = find_record(pt, prefix, pl, ".storage_alignment", 18);
    if (al != NULL) {
        if ((st = small_record(pt, al, small, sizeof(small), err)) != MLU_OK)
            goto done;
        if (parse_version(small, &align) < 0 || align == 0 || align > 0xFFFFu)
            goto done;  /* torch itself fails on it: nothing silent */
    }
    for (i = 0; i < pt->vm.n_storages; i++)
        if (pt->src[i].kind != MLU_PT_SRC_STORED)
            goto done;  /* a deflated record cannot be used in place at all */
    order = mlu_calloc(pt->vm.n_storages, sizeof(*order));
    if (order == NULL) {
        st = mlu_error_set(err, MLU_ENOMEM, -1, "out of memory for %u storages", pt->vm.n_storages);
        goto done;
    }
    for (i = 0; i < pt->vm.n_storages; i++) {
        order[i].at = pt->vm.storages[i].first_offset;
        order[i].idx = i;
    }
    qsort(order, pt->vm.n_storages, sizeof(*order), cmp_first_use);
    {
        const mlu_pk_storage *s0 = &pt->vm.storages[order[0].idx];
        if (s0->key_len != 1 || s0->key[0] != '0')
            goto done;  /* torch asserts that the first storage is '0': nothing silent */
    }
    for (i = 0; i < pt->vm.n_storages; i++) {
        const mlu_pk_storage *s = &pt->vm.storages[order[i].idx];
        const mlu_zip_entry *e = pt->src[order[i].idx].entry;
        uint64_t want;
        if (i == 0) {
            lfh = e->lfh_offset;
            want = e->data_offset;
        } else {
            size_t full = pl + 1 + 5 + s->key_len;  /* "<prefix>/data/<key>" */
            uint64_t extra = MLU_ZIP_EXTRA_HEAD;  /* the padding extra field */
            lfh = cur;
            if (s->nbytes >= MLU_ZIP64_LIMIT || cur >= MLU_ZIP64_LIMIT)
                extra += MLU_ZIP_EXTRA_HEAD + (s->nbytes >= MLU_ZIP64_LIMIT ? 16 : 0) + (cur >= MLU_ZIP64_LIMIT ? 8 : 0);
            want = cur + MLU_ZIP_LFH_SIZE + full + extra + mlu_zip_padding(cur, full, s->nbytes, (uint32_t)align, MLU_ZIP64_LIMIT);
            if (want != e->data_offset) {
                st = mlu_error_set(err, MLU_EFORMAT, (int64_t)e->data_offset,
                                   "record 'data/%.*s' starts at byte %llu, but torch computes byte %llu from "
                                   "'.format_version' (calculate_storage_offsets would read other bytes)",
                                   (int)s->key_len, s->key, (unsigned long long)e->data_offset, (unsigned long long)want);
                goto done;
            }
        }
        cur = want + s->nbytes;
        if (s->nbytes > 0)
            cur += (lfh >= MLU_ZIP64_LIMIT || s->nbytes >= MLU_ZIP64_LIMIT) ? 24 : 16;
    }
done:
    mlu_free(order);
    return st;
}

/* The archive's records all lie in one folder, <prefix>/ (torch's archive
 * name), and none is TorchScript's: sets *prefix and *pl (borrowed from the
 * first record's name). */
static mlu_status check_archive_prefix(const mlu_pt *pt, const char **prefix, size_t *pl, mlu_error *err)
{
    mlu_status st = MLU_OK;
    const mlu_zip_entry *e0 = &pt->zip.entries[0];
    const char *slash = memchr(e0->name, '/', e0->name_len);
    size_t i;

    if (slash == NULL || slash == e0->name) {
        st = mlu_error_set(err, MLU_EFORMAT, (int64_t)e0->lfh_offset, "file in archive is not in a subdirectory: '%.*s'",
                           (int)e0->name_len, e0->name);
        goto done;
    }
    *prefix = e0->name;
    *pl = (size_t)(slash - e0->name);
    for (i = 0; i < pt->zip.count; i++) {
        const mlu_zip_entry *e = &pt->zip.entries[i];
        if (e->name_len <= *pl + 1 || memcmp(e->name, *prefix, *pl + 1) != 0) {
            st = mlu_error_set(err, MLU_EFORMAT, (int64_t)e->lfh_offset, "zip entry '%.*s' is outside the archive prefix '%.*s/'",
                               (int)e->name_len, e->name, (int)*pl, *prefix);
            goto done;
        }
        if (e->name_len >= *pl + 6 && memcmp(e->name + *pl + 1, "code/", 5) == 0) {
            st = mlu_error_set(err, MLU_EUNSAFE, (int64_t)e->lfh_offset,
                               "TorchScript archive (record '%.*s'): refusing to load it as weights", (int)e->name_len, e->name);
            goto done;
        }
    }
    if (find_record(pt, *prefix, *pl, "constants.pkl", 13) != NULL)
        st = mlu_error_set(err, MLU_EUNSAFE, -1, "TorchScript archive (record 'constants.pkl'): refusing to load it as weights");
done:
    return st;
}

/* The number in the small record e (named `name` in errors) into *version. */
static mlu_status read_version(const mlu_pt *pt, const mlu_zip_entry *e, const char *name, unsigned long *version,
                               mlu_error *err)
{
    mlu_status st;
    char small[64];

    if ((st = small_record(pt, e, small, sizeof(small), err)) == MLU_OK && parse_version(small, version) < 0)
        st = mlu_error_set(err, MLU_EFORMAT, (int64_t)e->lfh_offset, "record '%s' is not a number", name);
    return st;
}

/* The archive's version ('.data/version', else 'version'): one this reader
 * knows, and not TorchScript's. */
static mlu_status check_archive_version(const mlu_pt *pt, const char *prefix, size_t pl, mlu_error *err)
{
    mlu_status st = MLU_OK;
    const mlu_zip_entry *dver = find_record(pt, prefix, pl, ".data/version", 13);
    const mlu_zip_entry *ver = find_record(pt, prefix, pl, "version", 7);
    unsigned long version = 0;

    if (dver != NULL) {
        if ((st = read_version(pt, dver, ".data/version", &version, err)) != MLU_OK)
            goto done;
        if (version >= 6) {
            st = mlu_error_set(err, MLU_EUNSAFE, (int64_t)dver->lfh_offset,
                               "TorchScript archive ('.data/version' = %lu): refusing to load it as weights", version);
            goto done;
        }
    } else if (ver != NULL) {
        if ((st = read_version(pt, ver, "version", &version, err)) != MLU_OK)
            goto done;
    } else {
        st = mlu_error_set(err, MLU_EFORMAT, -1, "failed locating file version: the archive has no 'version' record");
        goto done;
    }
    if (version < 1 || version > MAX_VERSION)
        st = mlu_error_set(err, MLU_EFORMAT, -1, "unsupported archive version %lu (supported: 1..%d)", version, MAX_VERSION);
done:
    return st;
}

/* The optional small records: '.data/serialization_id' must be UTF-8 (torch
 * reads it as a str), 'byteorder' 'little' or 'big' (sets pt->big_endian). */
static mlu_status check_small_records(mlu_pt *pt, const char *prefix, size_t pl, mlu_error *err)
{
    mlu_status st = MLU_OK;
    const mlu_zip_entry *sid = find_record(pt, prefix, pl, ".data/serialization_id", 22);
    const mlu_zip_entry *bo = find_record(pt, prefix, pl, "byteorder", 9);
    char idbuf[256], small[64];

    if (sid != NULL) {
        if ((st = small_record(pt, sid, idbuf, sizeof(idbuf), err)) != MLU_OK)
            goto done;
        if (mlu_utf8_invalid_at((const uint8_t *)idbuf, (size_t)sid->usize, 0) != (size_t)sid->usize) {
            st = mlu_error_set(err, MLU_EFORMAT, (int64_t)sid->lfh_offset, "record '.data/serialization_id' is not valid UTF-8");
            goto done;
        }
    }
    if (bo != NULL) {
        if ((st = small_record(pt, bo, small, sizeof(small), err)) != MLU_OK)
            goto done;
        if (strcmp(small, "big") == 0)
            pt->big_endian = 1;
        else if (strcmp(small, "little") != 0)
            st = mlu_error_set(err, MLU_EFORMAT, (int64_t)bo->lfh_offset, "record 'byteorder' must be 'little' or 'big'");
    }
done:
    return st;
}

/* Reads data.pkl into pt->pickle_owned (checked in full with `verify`) and
 * runs the pickle VM over it: pt->root and the storages it declares. */
static mlu_status run_data_pkl(mlu_pt *pt, const char *prefix, size_t pl, int verify, mlu_error *err)
{
    mlu_status st = MLU_OK;
    const mlu_zip_entry *pk = find_record(pt, prefix, pl, "data.pkl", 8);
    size_t ppos = 0;

    if (pk == NULL) {
        st = mlu_error_set(err, MLU_EFORMAT, -1, "the archive has no 'data.pkl' record");
        goto done;
    }
    if (verify && (st = mlu_zip_check(&pt->zip, pk, err)) != MLU_OK)
        goto done;
    /* an owned copy: the pickle's strings point into it */
    if (pk->usize > SIZE_MAX - 1) {
        st = mlu_error_set(err, MLU_EFORMAT, (int64_t)pk->lfh_offset, "record 'data.pkl' is too large (%llu bytes)",
                           (unsigned long long)pk->usize);
        goto done;
    }
    pt->pickle_owned = mlu_malloc(pk->usize ? (size_t)pk->usize : 1);
    if (pt->pickle_owned == NULL) {
        st = mlu_error_set(err, MLU_ENOMEM, -1, "out of memory for data.pkl (%llu bytes)", (unsigned long long)pk->usize);
        goto done;
    }
    if ((st = mlu_zip_extract(&pt->zip, pk, pt->pickle_owned, err)) != MLU_OK)
        goto done;
    if ((st = mlu_pk_run(&pt->vm, pt->pickle_owned, (size_t)pk->usize, &ppos, 0, &pt->root, err)) != MLU_OK)
        goto done;
    st = mlu_pk_finish(&pt->vm, err);
done:
    return st;
}

/* Finds the record 'data/<key>' of every storage, of the size the pickle
 * declares, and fills pt->src (each record checked in full with `verify`). */
static mlu_status resolve_storages(mlu_pt *pt, const char *prefix, size_t pl, int verify, mlu_error *err)
{
    mlu_status st = MLU_OK;
    char rest[MAX_RECORD_NAME];
    uint32_t i;

    pt->src = mlu_calloc(pt->vm.n_storages ? pt->vm.n_storages : 1, sizeof(*pt->src));
    if (pt->src == NULL) {
        st = mlu_error_set(err, MLU_ENOMEM, -1, "out of memory for storages");
        goto done;
    }
    memcpy(rest, "data/", 5);
    for (i = 0; i < pt->vm.n_storages; i++) {
        const mlu_pk_storage *s = &pt->vm.storages[i];
        const mlu_zip_entry *e;
        if (s->key_len + 5 > sizeof(rest)) {
            st = mlu_error_set(err, MLU_EFORMAT, -1, "storage key is too long");
            goto done;
        }
        memcpy(rest + 5, s->key, s->key_len);
        e = find_record(pt, prefix, pl, rest, 5 + s->key_len);
        if (e == NULL) {
            st = mlu_error_set(err, MLU_EFORMAT, (int64_t)s->first_offset, "storage '%.*s' has no record 'data/%.*s' in the archive",
                               (int)s->key_len, s->key, (int)s->key_len, s->key);
            goto done;
        }
        if (e->usize != s->nbytes) {
            st = mlu_error_set(err, MLU_EFORMAT, (int64_t)e->lfh_offset, "record size %llu of 'data/%.*s' mismatch with dst size %llu "
                               "(numel x element size from the pickle)", (unsigned long long)e->usize, (int)s->key_len, s->key,
                               (unsigned long long)s->nbytes);
            goto done;
        }
        if (pt->big_endian && s->swap_unit < 0) {
            st = mlu_error_set(err, MLU_EFORMAT, -1, "big-endian storage '%.*s' is viewed with element sizes that disagree",
                               (int)s->key_len, s->key);
            goto done;
        }
        pt->src[i].kind = e->method == 0 ? MLU_PT_SRC_STORED : MLU_PT_SRC_DEFLATED;
        pt->src[i].offset = e->data_offset;
        pt->src[i].entry = e;
        if (verify && (st = mlu_zip_check(&pt->zip, e, err)) != MLU_OK)
            goto done;
    }
done:
    return st;
}

static mlu_status open_zip(mlu_pt *pt, int verify, mlu_error *err)
{
    mlu_status st;
    const char *prefix = NULL;  /* borrowed from the first record's name */
    size_t pl = 0;

    if ((st = mlu_zip_open(&pt->zip, &pt->rd, err)) != MLU_OK ||
        (st = check_archive_prefix(pt, &prefix, &pl, err)) != MLU_OK ||
        (st = check_archive_version(pt, prefix, pl, err)) != MLU_OK ||
        (st = check_small_records(pt, prefix, pl, err)) != MLU_OK ||
        (st = run_data_pkl(pt, prefix, pl, verify, err)) != MLU_OK ||
        (st = resolve_storages(pt, prefix, pl, verify, err)) != MLU_OK)
        goto done;
    if (verify)
        st = check_computed_offsets(pt, prefix, pl, err);
done:
    return st;
}

static const mlu_pk_node *node(const mlu_pt *pt, uint32_t id) { return &pt->vm.nodes[id]; }

static uint32_t find_storage(const mlu_pt *pt, const char *key, size_t len)
{
    uint32_t lo = 0, hi = pt->vm.n_storages;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        const mlu_pk_storage *s = &pt->vm.storages[mid];
        int c = mlu_bytes_cmp(s->key, s->key_len, key, len);
        if (c == 0)
            return mid;
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return UINT32_MAX;
}

/* The five pickles of a legacy file, run over head[0..len): magic, protocol,
 * sys_info, the object (pt->root) and the key list (*keys).  *pos ends past
 * the last STOP. */
static mlu_status legacy_pickles(mlu_pt *pt, const uint8_t *head, size_t len, size_t *pos, uint32_t *keys, mlu_error *err)
{
    mlu_status st = MLU_EFORMAT;
    uint32_t magic, proto, info;
    const mlu_pk_node *n;

    if ((st = mlu_pk_run(&pt->vm, head, len, pos, 1, &magic, err)) != MLU_OK)
        goto done;
    st = MLU_EFORMAT;
    n = node(pt, magic);
    if (n->kind != MLU_PKN_BIGINT || n->u.s.n != 10 || memcmp(n->u.s.p, legacy_magic, 10) != 0) {
        mlu_error_set(err, MLU_EFORMAT, 0, "invalid magic number: not a PyTorch legacy file");
        goto done;
    }
    if ((st = mlu_pk_run(&pt->vm, head, len, pos, 1, &proto, err)) != MLU_OK)
        goto done;
    st = MLU_EFORMAT;
    if (node(pt, proto)->kind != MLU_PKN_INT || node(pt, proto)->u.i != 1001) {
        mlu_error_set(err, MLU_EFORMAT, (int64_t)*pos, "invalid protocol version in a legacy PyTorch file");
        goto done;
    }
    if ((st = mlu_pk_run(&pt->vm, head, len, pos, 1, &info, err)) != MLU_OK)
        goto done;
    st = MLU_EFORMAT;
    if (node(pt, info)->kind != MLU_PKN_DICT) {
        mlu_error_set(err, MLU_EFORMAT, (int64_t)*pos, "legacy sys_info is not a dict");
        goto done;
    }
    /* torch's legacy reader never looks at sys_info: storage bytes are read
     * in the machine's (little-endian) order whatever 'little_endian' says,
     * and so are they here */
    if ((st = mlu_pk_run(&pt->vm, head, len, pos, 1, &pt->root, err)) != MLU_OK)
        goto done;
    if ((st = mlu_pk_run(&pt->vm, head, len, pos, 1, keys, err)) != MLU_OK)
        goto done;
    st = mlu_pk_finish(&pt->vm, err);
done:
    return st;
}

/* The legacy pickles are read from the file's head; a head that ends
 * inside them is read again twice as long (up to the whole file). */
#define LEGACY_FIRST_READ ((size_t)1 << 20)

static mlu_status open_legacy(mlu_pt *pt, mlu_error *err)
{
    mlu_status st = MLU_EFORMAT;
    uint64_t size = pt->rd.size, pos = 0;
    size_t i, len, ppos;
    uint32_t keys = 0;
    const mlu_pk_node *n;
    uint64_t *seen = NULL;  /* owned */
    uint8_t first = 0;

    if (size >= 2 && (st = mlu_rd_read(&pt->rd, 0, &first, 1, "the first byte", err)) != MLU_OK)
        goto done;
    st = MLU_EFORMAT;
    if (size < 2 || first != MLU_PKOP_PROTO) {
        mlu_error_set(err, MLU_EFORMAT, 0, "not a PyTorch file: neither a zip archive nor a pickle stream");
        goto done;
    }
    len = size > LEGACY_FIRST_READ ? LEGACY_FIRST_READ : (size_t)size;
    for (;;) {
        uint8_t *head = mlu_realloc(pt->pickle_owned, len);
        if (head == NULL) {
            st = mlu_error_set(err, MLU_ENOMEM, -1, "out of memory for the legacy pickles (%zu bytes)", len);
            goto done;
        }
        pt->pickle_owned = head;
        if ((st = mlu_rd_read(&pt->rd, 0, head, len, "the legacy pickles", err)) != MLU_OK)
            goto done;
        ppos = 0;
        mlu_pk_vm_free(&pt->vm);
        mlu_pk_vm_init(&pt->vm);
        st = legacy_pickles(pt, head, len, &ppos, &keys, err);
        if (st == MLU_OK)
            break;
        if (!(pt->vm.truncated || pt->vm.over_budget) || len == size)
            goto done;
        len = len > size / 2 ? (size_t)size : 2 * len;
        mlu_error_clear(err);
    }
    st = MLU_EFORMAT;
    pos = ppos;
    n = node(pt, keys);
    if (n->kind != MLU_PKN_LIST) {
        mlu_error_set(err, MLU_EFORMAT, (int64_t)pos, "legacy storage key list is not a list");
        goto done;
    }
    pt->src = mlu_calloc(pt->vm.n_storages ? pt->vm.n_storages : 1, sizeof(*pt->src));
    seen = mlu_calloc(pt->vm.n_storages ? pt->vm.n_storages : 1, sizeof(*seen));
    if (pt->src == NULL || seen == NULL) {
        st = mlu_error_set(err, MLU_ENOMEM, -1, "out of memory for storages");
        goto done;
    }
    for (i = 0; i < n->len; i++) {
        const mlu_pk_node *k = node(pt, n->u.items[i]);
        uint32_t s;
        int64_t count;
        uint64_t nbytes;
        uint8_t cbuf[8];
        const mlu_pk_storage *ps;
        if (k->kind != MLU_PKN_STR) {
            mlu_error_set(err, MLU_EFORMAT, (int64_t)pos, "legacy storage key list holds a %s", mlu_pk_kind_name(k->kind));
            goto done;
        }
        s = find_storage(pt, k->u.s.p, k->u.s.n);
        if (s == UINT32_MAX || seen[s]) {
            mlu_error_set(err, MLU_EFORMAT, (int64_t)pos, "legacy storage key '%.*s' is %s", (int)k->u.s.n, k->u.s.p,
                          s == UINT32_MAX ? "not used by the object" : "listed twice");
            goto done;
        }
        ps = &pt->vm.storages[s];
        if (size - pos < 8) {
            mlu_error_set(err, MLU_EFORMAT, (int64_t)pos, "legacy file is truncated in storage '%.*s' at byte %llu",
                          (int)k->u.s.n, k->u.s.p, (unsigned long long)pos);
            goto done;
        }
        if ((st = mlu_rd_read(&pt->rd, pos, cbuf, 8, "a legacy storage count", err)) != MLU_OK)
            goto done;
        st = MLU_EFORMAT;
        count = (int64_t)mlu_le64(cbuf);
        if (count < 0 || (uint64_t)count != ps->legacy_numel) {
            mlu_error_set(err, MLU_EFORMAT, (int64_t)pos, "legacy storage '%.*s' holds %lld elements, the pickle says %llu",
                          (int)k->u.s.n, k->u.s.p, (long long)count, (unsigned long long)ps->legacy_numel);
            goto done;
        }
        pos += 8;
        nbytes = ps->nbytes;
        if (size - pos < nbytes) {
            mlu_error_set(err, MLU_EFORMAT, (int64_t)pos, "legacy file is truncated in storage '%.*s' at byte %llu",
                          (int)k->u.s.n, k->u.s.p, (unsigned long long)pos);
            goto done;
        }
        pt->src[s].kind = MLU_PT_SRC_RAW;
        pt->src[s].offset = pos;
        seen[s] = 1;
        pos += nbytes;
    }
    for (i = 0; i < pt->vm.n_storages; i++) {
        if (!seen[i]) {
            mlu_error_set(err, MLU_EFORMAT, -1, "legacy storage '%.*s' has no data", (int)pt->vm.storages[i].key_len,
                          pt->vm.storages[i].key);
            goto done;
        }
    }
    st = MLU_OK;
done:
    mlu_free(seen);
    return st;
}

mlu_status mlu_pt_open(mlu_pt *pt, const mlu_rd *rd, int verify, mlu_error *err)
{
    mlu_status st;
    uint8_t magic[4];

    memset(pt, 0, sizeof(*pt));
    mlu_pk_vm_init(&pt->vm);
    pt->rd = *rd;
    if (rd->size >= 4 && (st = mlu_rd_read(rd, 0, magic, 4, "the file magic", err)) != MLU_OK)
        goto done;
    if (rd->size >= 4 && mlu_le32(magic) == MLU_ZIP_LFH_SIG) {
        pt->is_zip = 1;
        st = open_zip(pt, verify, err);
    } else {
        st = open_legacy(pt, err);
    }
done:
    if (st != MLU_OK)
        mlu_pt_close(pt);
    return st;
}
void mlu_pt_close(mlu_pt *pt)
{
    mlu_zip_close(&pt->zip);
    mlu_pk_vm_free(&pt->vm);
    mlu_free(pt->pickle_owned);
    mlu_free(pt->src);
    pt->pickle_owned = NULL;
    pt->src = NULL;
}

int mlu_pt_storage_in_place(const mlu_pt *pt, uint32_t i, size_t align)
{
    const mlu_pt_storage_src *s = &pt->src[i];
    if (s->kind != MLU_PT_SRC_STORED || !pt->is_zip)
        return 0;
    if (pt->big_endian && pt->vm.storages[i].swap_unit > 1)
        return 0;
    return align == 0 || s->offset % align == 0;
}

void mlu_pt_byteswap(uint8_t *p, size_t n, int unit)
{
    size_t i;

    /* each whole element of `bits` bits, swapped in place */
#define SWAP_EACH(bits)                                         \
    for (i = 0; i + (bits) / 8 <= n; i += (bits) / 8) {         \
        uint##bits##_t v;                                       \
        memcpy(&v, p + i, sizeof(v));                           \
        v = __builtin_bswap##bits(v);                           \
        memcpy(p + i, &v, sizeof(v));                           \
    }
    switch (unit) {
    case 2:
        SWAP_EACH(16);
        break;
    case 4:
        SWAP_EACH(32);
        break;
    case 8:
        SWAP_EACH(64);
        break;
    default:
        break;
    }
#undef SWAP_EACH
}

mlu_status mlu_pt_storage_fill(const mlu_pt *pt, uint32_t i, uint8_t *dst, mlu_error *err)
{
    mlu_status st;
    const mlu_pt_storage_src *s = &pt->src[i];
    const mlu_pk_storage *ps = &pt->vm.storages[i];

    if (ps->nbytes > SIZE_MAX) {
        st = mlu_error_set(err, MLU_EFORMAT, -1, "storage '%.*s' is too large", (int)ps->key_len, ps->key);
        goto done;
    }
    if (s->kind == MLU_PT_SRC_DEFLATED)
        st = mlu_zip_extract(&pt->zip, s->entry, dst, err);
    else
        st = mlu_rd_read(&pt->rd, s->offset, dst, (size_t)ps->nbytes, "storage bytes", err);
    if (st == MLU_OK && pt->big_endian && ps->swap_unit > 1)
        mlu_pt_byteswap(dst, (size_t)ps->nbytes, ps->swap_unit);
done:
    return st;
}
