/* zipread.c: zip central directory reader (see zipread.h). */
#define _DEFAULT_SOURCE
#include "zipread.h"
#include "alloc.h"
#include "bytes.h"
#include "file.h"
#include "zipfmt.h"

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zlib.h>

#define EOCD_SIZE MLU_ZIP_EOCD_SIZE
#define EOCD64_MIN MLU_ZIP_EOCD64_SIZE
#define LOCATOR_SIZE MLU_ZIP_LOC64_SIZE
#define CDH_SIZE MLU_ZIP_CDH_SIZE
#define LFH_SIZE MLU_ZIP_LFH_SIZE
/* DEFLATE cannot expand beyond about 1032:1; a declared size above this is a bomb. */
#define DEFLATE_MAX_RATIO 1032u

/* Reads the zip64 extra (id 1) of a central entry: only the fields whose
 * 32-bit value is saturated are present, in the order usize, csize, offset. */
static mlu_status read_zip64_extra(const uint8_t *ex, size_t ex_len, int64_t where, mlu_zip_entry *e,
                                   int need_u, int need_c, int need_o, mlu_error *err)
{
    mlu_status st = MLU_OK;
    size_t pos = 0;

    while (pos + MLU_ZIP_EXTRA_HEAD <= ex_len) {
        uint16_t id = mlu_le16(ex + pos), len = mlu_le16(ex + pos + 2);
        const uint8_t *f = ex + pos + MLU_ZIP_EXTRA_HEAD;
        size_t need = 8u * (size_t)(need_u + need_c + need_o), k = 0;

        if (pos + MLU_ZIP_EXTRA_HEAD + len > ex_len) {
            st = mlu_error_set(err, MLU_EFORMAT, where, "zip extra field runs past its entry at byte %lld", (long long)where);
            goto done;
        }
        if (id == MLU_ZIP64_EXTRA_ID) {
            if (len < need) {
                st = mlu_error_set(err, MLU_EFORMAT, where, "zip64 extra field is too short at byte %lld", (long long)where);
                goto done;
            }
            if (need_u) { e->usize = mlu_le64(f + k); k += 8; }
            if (need_c) { e->csize = mlu_le64(f + k); k += 8; }
            if (need_o) { e->lfh_offset = mlu_le64(f + k); k += 8; }
            goto done;
        }
        pos += MLU_ZIP_EXTRA_HEAD + (size_t)len;
    }
    if (need_u || need_c || need_o)
        st = mlu_error_set(err, MLU_EFORMAT, where, "zip entry at byte %lld needs a zip64 extra field but has none",
                           (long long)where);
done:
    return st;
}

/* The order of records a and b by name (an mlu_index_cmp over a zip). */
static int cmp_names(const void *ctx, size_t a, size_t b)
{
    const mlu_zip *z = ctx;
    const mlu_zip_entry *x = &z->entries[a], *y = &z->entries[b];

    return mlu_bytes_cmp(x->name, x->name_len, y->name, y->name_len);
}

void mlu_rd_mem(mlu_rd *r, const uint8_t *data, size_t size)
{
    r->mem = data;
    r->fd = -1;
    r->size = size;
}

void mlu_rd_fd(mlu_rd *r, int fd, uint64_t size)
{
    r->mem = NULL;
    r->fd = fd;
    r->size = size;
}

mlu_status mlu_rd_read(const mlu_rd *r, uint64_t off, void *dst, size_t n, const char *what, mlu_error *err)
{
    mlu_status st = MLU_OK;
    uint64_t end;

    if (mlu_add_overflow_u64(off, n, &end) || end > r->size) {
        st = mlu_error_set(err, MLU_EFORMAT, (int64_t)off, "%s at byte %llu runs past the end of the file (%llu bytes; truncated file?)",
                           what, (unsigned long long)off, (unsigned long long)r->size);
        goto done;
    }
    if (r->mem != NULL) {
        if (n > 0)
            memcpy(dst, r->mem + off, n);
        goto done;
    }
    st = mlu_file_read_at(r->fd, off, dst, n, what, err);
done:
    return st;
}

/* The EOCD is within the last EOCD_SIZE + 65535 bytes, and a zip64 locator right
 * before it: this many tail bytes hold both. */
#define TAIL_MAX (EOCD_SIZE + 0xFFFFu + LOCATOR_SIZE)

typedef struct zip_span {
    uint64_t start, end;  /* local header to the end of the payload */
    size_t idx;
} zip_span;

static int cmp_span(const void *a, const void *b)
{
    const zip_span *x = a, *y = b;
    if (x->start != y->start)
        return x->start < y->start ? -1 : 1;
    return x->end < y->end ? -1 : x->end > y->end;
}

/* Refuses two records whose bytes (local header through payload) overlap:
 * torch.load reads them into independent tensors, while views of one
 * mapping would alias each other (a write to one changing the other). */
static mlu_status check_overlap(const mlu_zip *z, mlu_error *err)
{
    mlu_status st = MLU_OK;
    zip_span *sp = NULL;  /* owned */
    size_t i;

    if (z->count < 2)
        goto done;
    sp = mlu_calloc(z->count, sizeof(*sp));
    if (sp == NULL) {
        st = mlu_error_set(err, MLU_ENOMEM, -1, "out of memory for %zu zip entries", z->count);
        goto done;
    }
    for (i = 0; i < z->count; i++) {
        sp[i].start = z->entries[i].lfh_offset;
        sp[i].end = z->entries[i].data_offset + z->entries[i].csize;  /* checked <= the directory offset */
        sp[i].idx = i;
    }
    qsort(sp, z->count, sizeof(*sp), cmp_span);
    for (i = 1; i < z->count; i++) {
        if (sp[i].start < sp[i - 1].end) {
            const mlu_zip_entry *a = &z->entries[sp[i - 1].idx], *b = &z->entries[sp[i].idx];
            st = mlu_error_set(err, MLU_EFORMAT, (int64_t)b->lfh_offset,
                               "zip records '%.*s' (bytes %llu..%llu) and '%.*s' (from byte %llu) overlap",
                               (int)a->name_len, a->name, (unsigned long long)sp[i - 1].start,
                               (unsigned long long)sp[i - 1].end, (int)b->name_len, b->name,
                               (unsigned long long)sp[i].start);
            goto done;
        }
    }
done:
    mlu_free(sp);
    return st;
}

/* Where the central directory is, from the end records. */
typedef struct zip_dir {
    uint64_t off, size, count;  /* the directory's offset, size and entry count */
    uint64_t end;               /* what the directory must end before: the zip64 end record or the EOCD */
    uint64_t eocd;              /* the EOCD's offset (where errors about the directory point) */
} zip_dir;

/* The zip64 end record found through the locator at loc_at (its bytes: loc)
 * overrides the EOCD's 16- and 32-bit fields in *d. */
static mlu_status read_zip64_end(const mlu_rd *rd, uint64_t loc_at, const uint8_t *loc, zip_dir *d,
                                 mlu_error *err)
{
    mlu_status st = MLU_EFORMAT;
    uint64_t off64 = mlu_le64(loc + 8);
    uint8_t e64[EOCD64_MIN];

    if (mlu_le32(loc + 4) != 0 || mlu_le32(loc + 16) != 1) {
        st = mlu_error_set(err, MLU_EFORMAT, (int64_t)loc_at, "multi-disk zip archives are not supported (zip64 locator)");
        goto done;
    }
    if (off64 > loc_at || loc_at - off64 < EOCD64_MIN) {
        st = mlu_error_set(err, MLU_EFORMAT, (int64_t)loc_at, "zip64 locator at byte %llu points outside the file",
                           (unsigned long long)loc_at);
        goto done;
    }
    if ((st = mlu_rd_read(rd, off64, e64, EOCD64_MIN, "the zip64 end record", err)) != MLU_OK)
        goto done;
    if (mlu_le32(e64) != MLU_ZIP_EOCD64_SIG) {
        st = mlu_error_set(err, MLU_EFORMAT, (int64_t)off64, "zip64 end-of-central-directory record is missing at byte %llu",
                           (unsigned long long)off64);
        goto done;
    }
    if (mlu_le32(e64 + 16) != 0 || mlu_le32(e64 + 20) != 0) {
        st = mlu_error_set(err, MLU_EFORMAT, (int64_t)off64, "multi-disk zip archives are not supported (zip64 end record)");
        goto done;
    }
    d->count = mlu_le64(e64 + 32);
    d->size = mlu_le64(e64 + 40);
    d->off = mlu_le64(e64 + 48);
    if (mlu_le64(e64 + 24) != d->count) {
        st = mlu_error_set(err, MLU_EFORMAT, (int64_t)off64, "zip64 entry counts disagree");
        goto done;
    }
    d->end = off64;
done:
    return st;
}

/* Finds the EOCD in the file's last bytes (and the zip64 records it points
 * to) and fills *d, checked: the directory lies before its end records, and
 * its count is possible in its size. */
static mlu_status read_end_records(const mlu_rd *rd, zip_dir *d, mlu_error *err)
{
    mlu_status st = MLU_EFORMAT;
    uint64_t size = rd->size, tail_start, end;
    uint8_t *tail = NULL;  /* owned: the file's last tail_len bytes */
    const uint8_t *ep = NULL;
    size_t tail_len, i, lo;

    if (size < EOCD_SIZE) {
        st = mlu_error_set(err, MLU_EFORMAT, 0, "not a zip archive: %llu bytes is too short (truncated file?)",
                           (unsigned long long)size);
        goto done;
    }
    tail_len = size > TAIL_MAX ? TAIL_MAX : (size_t)size;
    tail_start = size - tail_len;
    if ((tail = mlu_malloc(tail_len)) == NULL) {
        st = mlu_error_set(err, MLU_ENOMEM, -1, "out of memory for the zip end records");
        goto done;
    }
    if ((st = mlu_rd_read(rd, tail_start, tail, tail_len, "the zip end records", err)) != MLU_OK)
        goto done;
    /* scan backwards for the EOCD whose comment ends within the file */
    lo = tail_len > EOCD_SIZE + 0xFFFFu ? tail_len - EOCD_SIZE - 0xFFFFu : 0;
    for (i = tail_len - EOCD_SIZE + 1; i-- > lo && ep == NULL;)
        if (mlu_le32(tail + i) == MLU_ZIP_EOCD_SIG && i + EOCD_SIZE + mlu_le16(tail + i + 20) <= tail_len)
            ep = tail + i;
    if (ep == NULL) {
        st = mlu_error_set(err, MLU_EFORMAT, (int64_t)size,
                           "failed finding central directory: no end-of-central-directory record (truncated file?)");
        goto done;
    }
    d->eocd = tail_start + (uint64_t)(ep - tail);
    if (mlu_le16(ep + 4) != 0 || mlu_le16(ep + 6) != 0) {
        st = mlu_error_set(err, MLU_EFORMAT, (int64_t)d->eocd, "multi-disk zip archives are not supported");
        goto done;
    }
    d->count = mlu_le16(ep + 10);
    d->size = mlu_le32(ep + 12);
    d->off = mlu_le32(ep + 16);
    d->end = d->eocd;
    /* the locator, when present, lies in the tail (TAIL_MAX leaves room for it) */
    if ((size_t)(ep - tail) >= LOCATOR_SIZE && mlu_le32(ep - LOCATOR_SIZE) == MLU_ZIP_LOC64_SIG) {
        if ((st = read_zip64_end(rd, d->eocd - LOCATOR_SIZE, ep - LOCATOR_SIZE, d, err)) != MLU_OK)
            goto done;
    } else if (d->count == 0xFFFF || d->size == 0xFFFFFFFFu || d->off == 0xFFFFFFFFu) {
        st = mlu_error_set(err, MLU_EFORMAT, (int64_t)d->eocd, "zip needs zip64 records but has none");
        goto done;
    }
    if (mlu_add_overflow_u64(d->off, d->size, &end) || end > d->end) {
        st = mlu_error_set(err, MLU_EFORMAT, (int64_t)d->eocd, "central directory lies outside the file (truncated file?)");
        goto done;
    }
    /* each entry takes at least CDH_SIZE bytes: never allocate from the count alone */
    if (d->count > d->size / CDH_SIZE) {
        st = mlu_error_set(err, MLU_EFORMAT, (int64_t)d->eocd, "central directory claims %llu entries in %llu bytes",
                           (unsigned long long)d->count, (unsigned long long)d->size);
        goto done;
    }
    if (d->count == 0) {
        st = mlu_error_set(err, MLU_EFORMAT, (int64_t)d->eocd, "zip archive has no entries");
        goto done;
    }
    if (d->size > SIZE_MAX - 1) {
        st = mlu_error_set(err, MLU_EFORMAT, (int64_t)d->eocd, "central directory is too large");
        goto done;
    }
done:
    mlu_free(tail);
    return st;
}

/* Checks what a central directory entry says of its record (at byte `at`):
 * one disk, not a directory, not encrypted, stored or deflated, sizes that
 * the method allows. */
static mlu_status check_entry(const mlu_zip_entry *e, const uint8_t *h, uint64_t at, mlu_error *err)
{
    mlu_status st = MLU_OK;
    int nl = (int)e->name_len;

    if (mlu_le16(h + 34) != 0) {  /* disk number start: torch (miniz) refuses multi-disk archives */
        st = mlu_error_set(err, MLU_EFORMAT, (int64_t)at, "zip entry '%.*s' is on disk %u: multi-disk archives are not supported",
                           nl, e->name, mlu_le16(h + 34));
        goto done;
    }
    /* torch's miniz takes a record whose MS-DOS attributes say "directory" for one, and
     * hands back bytes it never read: refuse it rather than differ */
    if (mlu_le32(h + 38) & 0x10u) {
        st = mlu_error_set(err, MLU_EFORMAT, (int64_t)at, "zip entry '%.*s' is marked as a directory (external attributes)",
                           nl, e->name);
        goto done;
    }
    /* encrypted, strongly encrypted, masked local headers (refused by torch's miniz too) */
    if (e->flags & (MLU_ZIP_FLAG_ENCRYPTED | MLU_ZIP_FLAG_STRONG_ENCRYPTION | MLU_ZIP_FLAG_MASKED_HEADER)) {
        st = mlu_error_set(err, MLU_EFORMAT, (int64_t)at, "zip entry '%.*s' is encrypted", nl, e->name);
        goto done;
    }
    if (e->method != 0 && e->method != 8) {
        st = mlu_error_set(err, MLU_EFORMAT, (int64_t)at, "zip entry '%.*s' uses compression method %u (only stored and deflated are supported)",
                           nl, e->name, e->method);
        goto done;
    }
    if (e->method == 0 && e->csize != e->usize) {
        st = mlu_error_set(err, MLU_EFORMAT, (int64_t)at, "stored zip entry '%.*s' has different compressed and uncompressed sizes",
                           nl, e->name);
        goto done;
    }
    if (e->method == 8 && e->usize / DEFLATE_MAX_RATIO > e->csize + 64) {
        st = mlu_error_set(err, MLU_EFORMAT, (int64_t)at, "deflated zip entry '%.*s' declares %llu bytes from %llu: impossible ratio (zip bomb?)",
                           nl, e->name, (unsigned long long)e->usize, (unsigned long long)e->csize);
        goto done;
    }
done:
    return st;
}

/* Reads the local header of e (whose directory entry is at byte `at`) into
 * lfh (LFH_SIZE + 0xFFFF bytes) and sets e->data_offset: the header must lie
 * before the directory (at cd_off), name the same record, and its payload
 * end before the directory. */
static mlu_status read_local_header(const mlu_rd *rd, mlu_zip_entry *e, uint64_t at, uint64_t cd_off, uint8_t *lfh,
                                    mlu_error *err)
{
    mlu_status st = MLU_EFORMAT;
    int nl = (int)e->name_len;
    uint64_t end;

    if (e->lfh_offset > cd_off || cd_off - e->lfh_offset < LFH_SIZE + (uint64_t)e->name_len) {
        st = mlu_error_set(err, MLU_EFORMAT, (int64_t)at, "zip entry '%.*s' has its local header outside the file", nl, e->name);
        goto done;
    }
    if ((st = mlu_rd_read(rd, e->lfh_offset, lfh, LFH_SIZE + e->name_len, "a local file header", err)) != MLU_OK)
        goto done;
    if (mlu_le32(lfh) != MLU_ZIP_LFH_SIG) {
        st = mlu_error_set(err, MLU_EFORMAT, (int64_t)e->lfh_offset, "zip entry '%.*s' has no local header at byte %llu", nl,
                           e->name, (unsigned long long)e->lfh_offset);
        goto done;
    }
    e->data_offset = e->lfh_offset + LFH_SIZE + mlu_le16(lfh + 26) + mlu_le16(lfh + 28);
    if (mlu_le16(lfh + 26) != e->name_len || e->data_offset > cd_off || memcmp(lfh + LFH_SIZE, e->name, e->name_len) != 0) {
        st = mlu_error_set(err, MLU_EFORMAT, (int64_t)e->lfh_offset, "local header of zip entry '%.*s' does not match the directory",
                           nl, e->name);
        goto done;
    }
    if (mlu_add_overflow_u64(e->data_offset, e->csize, &end) || end > cd_off) {
        st = mlu_error_set(err, MLU_EFORMAT, (int64_t)e->data_offset, "zip entry '%.*s' runs past the end of the data (truncated file?)",
                           nl, e->name);
        goto done;
    }
done:
    return st;
}

/* Parses the central directory entry i, at byte *pos of the directory copy
 * z->cd, into z->entries[i] (reading its local header into lfh) and moves
 * *pos past it. */
static mlu_status read_entry(mlu_zip *z, const zip_dir *d, size_t i, uint64_t *pos, uint8_t *lfh, mlu_error *err)
{
    mlu_status st = MLU_EFORMAT;
    const uint8_t *h = z->cd + *pos;
    mlu_zip_entry *e = &z->entries[i];
    uint64_t at = d->off + *pos;
    uint32_t c32, u32, o32;
    size_t nl, xl, cl;

    if (d->size - *pos < CDH_SIZE || mlu_le32(h) != MLU_ZIP_CDH_SIG) {
        st = mlu_error_set(err, MLU_EFORMAT, (int64_t)at, "central directory entry %zu at byte %llu is corrupt", i,
                           (unsigned long long)at);
        goto done;
    }
    e->flags = mlu_le16(h + 8);
    e->method = mlu_le16(h + 10);
    e->crc = mlu_le32(h + 16);
    c32 = mlu_le32(h + 20);
    u32 = mlu_le32(h + 24);
    nl = mlu_le16(h + 28);
    xl = mlu_le16(h + 30);
    cl = mlu_le16(h + 32);
    o32 = mlu_le32(h + 42);
    if (d->size - *pos - CDH_SIZE < (uint64_t)nl + xl + cl) {
        st = mlu_error_set(err, MLU_EFORMAT, (int64_t)at, "central directory entry %zu runs past the directory", i);
        goto done;
    }
    e->name = (const char *)h + CDH_SIZE;
    e->name_len = nl;
    e->csize = c32;
    e->usize = u32;
    e->lfh_offset = o32;
    st = read_zip64_extra(h + CDH_SIZE + nl, xl, (int64_t)at, e, u32 == 0xFFFFFFFFu, c32 == 0xFFFFFFFFu,
                          o32 == 0xFFFFFFFFu, err);
    if (st == MLU_OK)
        st = check_entry(e, h, at, err);
    if (st == MLU_OK)
        st = read_local_header(&z->rd, e, at, d->off, lfh, err);
    if (st == MLU_OK)
        *pos += CDH_SIZE + nl + xl + cl;
done:
    return st;
}

/* Refuses two records of the same name (z->sorted in name order). */
static mlu_status check_unique_names(const mlu_zip *z, mlu_error *err)
{
    mlu_status st = MLU_OK;
    size_t i;

    for (i = 1; i < z->count && st == MLU_OK; i++) {
        if (cmp_names(z, z->sorted[i - 1], z->sorted[i]) == 0) {
            const mlu_zip_entry *e = &z->entries[z->sorted[i]];
            st = mlu_error_set(err, MLU_EFORMAT, (int64_t)e->lfh_offset, "zip holds two records named '%.*s'",
                               (int)e->name_len, e->name);
        }
    }
    return st;
}

mlu_status mlu_zip_open(mlu_zip *z, const mlu_rd *rd, mlu_error *err)
{
    mlu_status st;
    zip_dir d = {0, 0, 0, 0, 0};
    uint8_t *lfh = NULL;  /* owned: one local header at a time */
    uint64_t pos = 0;     /* in the directory */
    size_t i;

    memset(z, 0, sizeof(*z));
    z->rd = *rd;
    if ((st = read_end_records(rd, &d, err)) != MLU_OK)
        goto error;
    /* d.size <= the file size (checked): a copy no larger than the input */
    z->cd = mlu_malloc((size_t)d.size);
    z->entries = mlu_calloc((size_t)d.count, sizeof(*z->entries));
    z->sorted = mlu_calloc((size_t)d.count, sizeof(*z->sorted));
    lfh = mlu_malloc(LFH_SIZE + 0xFFFFu);
    if (z->cd == NULL || z->entries == NULL || z->sorted == NULL || lfh == NULL) {
        st = mlu_error_set(err, MLU_ENOMEM, -1, "out of memory for %llu zip entries", (unsigned long long)d.count);
        goto error;
    }
    if ((st = mlu_rd_read(rd, d.off, z->cd, (size_t)d.size, "the central directory", err)) != MLU_OK)
        goto error;
    for (i = 0; i < (size_t)d.count; i++) {
        if ((st = read_entry(z, &d, i, &pos, lfh, err)) != MLU_OK)
            goto error;
        z->sorted[i] = i;
    }
    z->count = (size_t)d.count;
    mlu_sort_indices(z->sorted, z->count, cmp_names, z);
    if ((st = check_unique_names(z, err)) != MLU_OK || (st = check_overlap(z, err)) != MLU_OK)
        goto error;
    goto done;
error:
    mlu_zip_close(z);
done:
    mlu_free(lfh);
    return st;
}

void mlu_zip_close(mlu_zip *z)
{
    mlu_free(z->cd);
    z->cd = NULL;
    mlu_free(z->entries);
    mlu_free(z->sorted);
    z->entries = NULL;
    z->sorted = NULL;
    z->count = 0;
}

const mlu_zip_entry *mlu_zip_find(const mlu_zip *z, const char *name, size_t len)
{
    size_t lo = 0, hi = z->count;

    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        const mlu_zip_entry *e = &z->entries[z->sorted[mid]];
        int c = mlu_bytes_cmp(e->name, e->name_len, name, len);
        if (c == 0)
            return e;
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return NULL;
}

#define IN_CHUNK ((size_t)1 << 16)

/* Inflates e into dst (capacity e->usize) or, when dst is NULL, into a
 * scratch buffer; the CRC-32 of the output goes to *crc_out when not NULL.
 * Compressed bytes come from memory or, for a file, through a pread buffer. */
static mlu_status inflate_entry(const mlu_zip *z, const mlu_zip_entry *e, uint8_t *dst, uint32_t *crc_out,
                                mlu_error *err)
{
    uLong crc = crc32(0L, Z_NULL, 0);
    mlu_status st = MLU_EFORMAT;
    z_stream s;
    uint8_t scratch[16384];
    uint8_t *inbuf = NULL;  /* owned: file input window */
    uint64_t in_left = e->csize, in_pos = e->data_offset, out_total = 0;
    int rc = Z_OK, inited = 0;

    memset(&s, 0, sizeof(s));
    if (z->rd.mem == NULL && (inbuf = mlu_malloc(IN_CHUNK)) == NULL) {
        st = mlu_error_set(err, MLU_ENOMEM, -1, "out of memory inflating '%.*s'", (int)e->name_len, e->name);
        goto done;
    }
    if (inflateInit2(&s, -MAX_WBITS) != Z_OK) {
        st = mlu_error_set(err, MLU_ENOMEM, -1, "zlib inflateInit failed");
        goto done;
    }
    inited = 1;
    while (rc != Z_STREAM_END) {
        uint64_t out_left = e->usize - out_total;
        unsigned chunk_in, chunk_out;
        int out_probe = 0;

        if (s.avail_in == 0 && in_left > 0) {
            if (inbuf == NULL) {
                chunk_in = in_left > (1u << 30) ? (1u << 30) : (unsigned)in_left;
                s.next_in = (Bytef *)(uintptr_t)(z->rd.mem + in_pos);
            } else {
                chunk_in = in_left > IN_CHUNK ? (unsigned)IN_CHUNK : (unsigned)in_left;
                if ((st = mlu_rd_read(&z->rd, in_pos, inbuf, chunk_in, "a deflated record", err)) != MLU_OK)
                    goto done;
                st = MLU_EFORMAT;
                s.next_in = inbuf;
            }
            s.avail_in = chunk_in;
            in_pos += chunk_in;
            in_left -= chunk_in;
        }
        if (dst != NULL && out_left > 0) {
            chunk_out = out_left > (1u << 30) ? (1u << 30) : (unsigned)out_left;
            s.next_out = dst + out_total;
        } else {
            /* scratch output: a bounded window; output past usize means the record lies */
            chunk_out = out_left > sizeof(scratch) ? (unsigned)sizeof(scratch) : (unsigned)out_left;
            if (chunk_out == 0) {
                chunk_out = 1;
                out_probe = 1;
            }
            s.next_out = scratch;
        }
        s.avail_out = chunk_out;
        rc = inflate(&s, Z_NO_FLUSH);
        if (crc_out != NULL && chunk_out > s.avail_out && !out_probe)
            crc = crc32(crc, s.next_out - (chunk_out - s.avail_out), chunk_out - s.avail_out);
        out_total += chunk_out - s.avail_out;
        if (out_probe && s.avail_out == 0) {
            mlu_error_set(err, MLU_EFORMAT, (int64_t)e->data_offset, "deflated record '%.*s' inflates past its declared %llu bytes (zip bomb?)",
                          (int)e->name_len, e->name, (unsigned long long)e->usize);
            goto done;
        }
        if (rc == Z_STREAM_END)
            break;
        if (rc == Z_BUF_ERROR && s.avail_in == 0 && in_left == 0) {
            mlu_error_set(err, MLU_EFORMAT, (int64_t)e->data_offset, "deflated record '%.*s' is truncated", (int)e->name_len, e->name);
            goto done;
        }
        if (rc != Z_OK && rc != Z_BUF_ERROR) {
            mlu_error_set(err, MLU_EFORMAT, (int64_t)e->data_offset, "deflated record '%.*s' is corrupt: %s",
                          (int)e->name_len, e->name, s.msg ? s.msg : "zlib error");
            goto done;
        }
    }
    if (out_total != e->usize) {
        mlu_error_set(err, MLU_EFORMAT, (int64_t)e->data_offset, "deflated record '%.*s' inflates to %llu bytes, declared %llu",
                      (int)e->name_len, e->name, (unsigned long long)out_total, (unsigned long long)e->usize);
        goto done;
    }
    if (crc_out != NULL)
        *crc_out = (uint32_t)crc;
    st = MLU_OK;
done:
    if (inited)
        inflateEnd(&s);
    mlu_free(inbuf);
    return st;
}

mlu_status mlu_zip_extract(const mlu_zip *z, const mlu_zip_entry *e, uint8_t *dst, mlu_error *err)
{
    mlu_status st;

    if (e->method == 0)
        st = mlu_rd_read(&z->rd, e->data_offset, dst, (size_t)e->usize, "a stored record", err);
    else
        st = inflate_entry(z, e, dst, NULL, err);
    return st;
}

#define CRC_CHUNK ((size_t)1 << 20)

mlu_status mlu_zip_check(const mlu_zip *z, const mlu_zip_entry *e, mlu_error *err)
{
    mlu_status st = MLU_OK;
    uint32_t crc = 0;
    uint8_t *buf = NULL;  /* owned: file read window */

    if (e->method == 0) {
        uLong c = crc32(0L, Z_NULL, 0);
        uint64_t done = 0;
        if (z->rd.mem == NULL && (buf = mlu_malloc(CRC_CHUNK)) == NULL) {
            st = mlu_error_set(err, MLU_ENOMEM, -1, "out of memory checking '%.*s'", (int)e->name_len, e->name);
            goto done;
        }
        while (done < e->usize) {
            size_t chunk = e->usize - done > CRC_CHUNK ? CRC_CHUNK : (size_t)(e->usize - done);
            const uint8_t *p;
            if (buf != NULL) {
                if ((st = mlu_rd_read(&z->rd, e->data_offset + done, buf, chunk, "a stored record", err)) != MLU_OK)
                    goto done;
                p = buf;
            } else {
                p = z->rd.mem + e->data_offset + done;
            }
            c = crc32(c, p, (uInt)chunk);
            done += chunk;
        }
        crc = (uint32_t)c;
    } else {
        st = inflate_entry(z, e, NULL, &crc, err);
        if (st != MLU_OK)
            goto done;
    }
    if (e->crc != 0 && crc != e->crc)
        st = mlu_error_set(err, MLU_EFORMAT, (int64_t)e->lfh_offset, "CRC-32 mismatch in record '%.*s': the file is corrupt",
                           (int)e->name_len, e->name);
done:
    mlu_free(buf);
    return st;
}
