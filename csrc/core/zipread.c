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

mlu_status mlu_zip_open(mlu_zip *z, const mlu_rd *rd, mlu_error *err)
{
    mlu_status st = MLU_EFORMAT;
    uint64_t cd_off, cd_size, count, pos, cd_end, size = rd->size, tail_start, eocd = 0;
    uint8_t *tail = NULL, *lfh = NULL, e64[EOCD64_MIN];
    size_t tail_len, i, lo;
    int found = 0;

    memset(z, 0, sizeof(*z));
    z->rd = *rd;
    if (size < EOCD_SIZE) {
        st = mlu_error_set(err, MLU_EFORMAT, 0, "not a zip archive: %llu bytes is too short (truncated file?)",
                           (unsigned long long)size);
        goto error;
    }
    tail_len = size > TAIL_MAX ? TAIL_MAX : (size_t)size;
    tail_start = size - tail_len;
    if ((tail = mlu_malloc(tail_len)) == NULL) {
        st = mlu_error_set(err, MLU_ENOMEM, -1, "out of memory for the zip end records");
        goto error;
    }
    if ((st = mlu_rd_read(rd, tail_start, tail, tail_len, "the zip end records", err)) != MLU_OK)
        goto error;
    st = MLU_EFORMAT;
    /* scan backwards for the EOCD whose comment ends within the file */
    lo = tail_len > EOCD_SIZE + 0xFFFFu ? tail_len - EOCD_SIZE - 0xFFFFu : 0;
    for (i = tail_len - EOCD_SIZE + 1; i-- > lo;) {
        if (mlu_le32(tail + i) == MLU_ZIP_EOCD_SIG &&
            i + EOCD_SIZE + mlu_le16(tail + i + 20) <= tail_len) {
            eocd = tail_start + i;
            found = 1;
            break;
        }
    }
    if (!found) {
        mlu_error_set(err, MLU_EFORMAT, (int64_t)size,
                      "failed finding central directory: no end-of-central-directory record (truncated file?)");
        goto error;
    }
    {
        const uint8_t *ep = tail + (eocd - tail_start);
        if (mlu_le16(ep + 4) != 0 || mlu_le16(ep + 6) != 0) {
            mlu_error_set(err, MLU_EFORMAT, (int64_t)eocd, "multi-disk zip archives are not supported");
            goto error;
        }
        count = mlu_le16(ep + 10);
        cd_size = mlu_le32(ep + 12);
        cd_off = mlu_le32(ep + 16);
    }
    /* the locator, when present, lies in the tail (TAIL_MAX leaves room for it) */
    if (eocd >= tail_start + LOCATOR_SIZE && mlu_le32(tail + (eocd - tail_start) - LOCATOR_SIZE) == MLU_ZIP_LOC64_SIG) {
        uint64_t loc_at = eocd - LOCATOR_SIZE;
        uint64_t off64 = mlu_le64(tail + (loc_at - tail_start) + 8);
        if (mlu_le32(tail + (loc_at - tail_start) + 4) != 0 || mlu_le32(tail + (loc_at - tail_start) + 16) != 1) {
            mlu_error_set(err, MLU_EFORMAT, (int64_t)loc_at, "multi-disk zip archives are not supported (zip64 locator)");
            goto error;
        }
        if (off64 > loc_at || loc_at - off64 < EOCD64_MIN) {
            mlu_error_set(err, MLU_EFORMAT, (int64_t)loc_at, "zip64 locator at byte %llu points outside the file",
                          (unsigned long long)loc_at);
            goto error;
        }
        if ((st = mlu_rd_read(rd, off64, e64, EOCD64_MIN, "the zip64 end record", err)) != MLU_OK)
            goto error;
        st = MLU_EFORMAT;
        if (mlu_le32(e64) != MLU_ZIP_EOCD64_SIG) {
            mlu_error_set(err, MLU_EFORMAT, (int64_t)off64, "zip64 end-of-central-directory record is missing at byte %llu",
                          (unsigned long long)off64);
            goto error;
        }
        if (mlu_le32(e64 + 16) != 0 || mlu_le32(e64 + 20) != 0) {
            mlu_error_set(err, MLU_EFORMAT, (int64_t)off64, "multi-disk zip archives are not supported (zip64 end record)");
            goto error;
        }
        count = mlu_le64(e64 + 32);
        cd_size = mlu_le64(e64 + 40);
        cd_off = mlu_le64(e64 + 48);
        if (mlu_le64(e64 + 24) != count) {
            mlu_error_set(err, MLU_EFORMAT, (int64_t)off64, "zip64 entry counts disagree");
            goto error;
        }
        cd_end = off64;
    } else {
        if (count == 0xFFFF || cd_size == 0xFFFFFFFFu || cd_off == 0xFFFFFFFFu) {
            mlu_error_set(err, MLU_EFORMAT, (int64_t)eocd, "zip needs zip64 records but has none");
            goto error;
        }
        cd_end = eocd;
    }
    if (mlu_add_overflow_u64(cd_off, cd_size, &pos) || pos > cd_end) {
        mlu_error_set(err, MLU_EFORMAT, (int64_t)eocd, "central directory lies outside the file (truncated file?)");
        goto error;
    }
    /* each entry takes at least CDH_SIZE bytes: never allocate from the count alone */
    if (count > cd_size / CDH_SIZE) {
        mlu_error_set(err, MLU_EFORMAT, (int64_t)eocd, "central directory claims %llu entries in %llu bytes",
                      (unsigned long long)count, (unsigned long long)cd_size);
        goto error;
    }
    if (count == 0) {
        mlu_error_set(err, MLU_EFORMAT, (int64_t)eocd, "zip archive has no entries");
        goto error;
    }
    if (cd_size > SIZE_MAX - 1) {
        mlu_error_set(err, MLU_EFORMAT, (int64_t)eocd, "central directory is too large");
        goto error;
    }
    /* cd_size <= the file size (checked above): a copy no larger than the input */
    z->cd = mlu_malloc((size_t)cd_size);
    z->entries = mlu_calloc((size_t)count, sizeof(*z->entries));
    z->sorted = mlu_calloc((size_t)count, sizeof(*z->sorted));
    lfh = mlu_malloc(LFH_SIZE + 0xFFFFu);
    if (z->cd == NULL || z->entries == NULL || z->sorted == NULL || lfh == NULL) {
        st = mlu_error_set(err, MLU_ENOMEM, -1, "out of memory for %llu zip entries", (unsigned long long)count);
        goto error;
    }
    if ((st = mlu_rd_read(rd, cd_off, z->cd, (size_t)cd_size, "the central directory", err)) != MLU_OK)
        goto error;
    st = MLU_EFORMAT;
    pos = 0; /* from here on relative to cd_off */
    for (i = 0; i < (size_t)count; i++) {
        const uint8_t *h = z->cd + pos;
        mlu_zip_entry *e = &z->entries[i];
        uint64_t at = cd_off + pos, end;
        uint32_t c32, u32, o32;
        size_t nl, xl, cl;

        if (cd_size - pos < CDH_SIZE || mlu_le32(h) != MLU_ZIP_CDH_SIG) {
            mlu_error_set(err, MLU_EFORMAT, (int64_t)at, "central directory entry %zu at byte %llu is corrupt", i,
                          (unsigned long long)at);
            goto error;
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
        if (cd_size - pos - CDH_SIZE < (uint64_t)nl + xl + cl) {
            mlu_error_set(err, MLU_EFORMAT, (int64_t)at, "central directory entry %zu runs past the directory", i);
            goto error;
        }
        e->name = (const char *)h + CDH_SIZE;
        e->name_len = nl;
        e->csize = c32;
        e->usize = u32;
        e->lfh_offset = o32;
        st = read_zip64_extra(h + CDH_SIZE + nl, xl, (int64_t)at, e, u32 == 0xFFFFFFFFu, c32 == 0xFFFFFFFFu,
                              o32 == 0xFFFFFFFFu, err);
        if (st != MLU_OK)
            goto error;
        st = MLU_EFORMAT;
        if (mlu_le16(h + 34) != 0) {  /* disk number start: torch (miniz) refuses multi-disk archives */
            mlu_error_set(err, MLU_EFORMAT, (int64_t)at, "zip entry '%.*s' is on disk %u: multi-disk archives are not supported",
                          (int)nl, e->name, mlu_le16(h + 34));
            goto error;
        }
        /* torch's miniz takes a record whose MS-DOS attributes say "directory" for one, and
         * hands back bytes it never read: refuse it rather than differ */
        if (mlu_le32(h + 38) & 0x10u) {
            mlu_error_set(err, MLU_EFORMAT, (int64_t)at, "zip entry '%.*s' is marked as a directory (external attributes)",
                          (int)nl, e->name);
            goto error;
        }
        /* encrypted, strongly encrypted, masked local headers (refused by torch's miniz too) */
        if (e->flags & (MLU_ZIP_FLAG_ENCRYPTED | MLU_ZIP_FLAG_STRONG_ENCRYPTION | MLU_ZIP_FLAG_MASKED_HEADER)) {
            mlu_error_set(err, MLU_EFORMAT, (int64_t)at, "zip entry '%.*s' is encrypted", (int)nl, e->name);
            goto error;
        }
        if (e->method != 0 && e->method != 8) {
            mlu_error_set(err, MLU_EFORMAT, (int64_t)at, "zip entry '%.*s' uses compression method %u (only stored and deflated are supported)",
                          (int)nl, e->name, e->method);
            goto error;
        }
        if (e->method == 0 && e->csize != e->usize) {
            mlu_error_set(err, MLU_EFORMAT, (int64_t)at, "stored zip entry '%.*s' has different compressed and uncompressed sizes",
                          (int)nl, e->name);
            goto error;
        }
        if (e->method == 8 && e->usize / DEFLATE_MAX_RATIO > e->csize + 64) {
            mlu_error_set(err, MLU_EFORMAT, (int64_t)at, "deflated zip entry '%.*s' declares %llu bytes from %llu: impossible ratio (zip bomb?)",
                          (int)nl, e->name, (unsigned long long)e->usize, (unsigned long long)e->csize);
            goto error;
        }
        /* the local header must be in the file before the directory and name the same record */
        if (e->lfh_offset > cd_off || cd_off - e->lfh_offset < LFH_SIZE + (uint64_t)nl) {
            mlu_error_set(err, MLU_EFORMAT, (int64_t)at, "zip entry '%.*s' has its local header outside the file", (int)nl, e->name);
            goto error;
        }
        if ((st = mlu_rd_read(rd, e->lfh_offset, lfh, LFH_SIZE + nl, "a local file header", err)) != MLU_OK)
            goto error;
        st = MLU_EFORMAT;
        if (mlu_le32(lfh) != MLU_ZIP_LFH_SIG) {
            mlu_error_set(err, MLU_EFORMAT, (int64_t)e->lfh_offset, "zip entry '%.*s' has no local header at byte %llu", (int)nl,
                          e->name, (unsigned long long)e->lfh_offset);
            goto error;
        }
        e->data_offset = e->lfh_offset + LFH_SIZE + mlu_le16(lfh + 26) + mlu_le16(lfh + 28);
        if (mlu_le16(lfh + 26) != nl || e->data_offset > cd_off || memcmp(lfh + LFH_SIZE, e->name, nl) != 0) {
            mlu_error_set(err, MLU_EFORMAT, (int64_t)e->lfh_offset, "local header of zip entry '%.*s' does not match the directory",
                          (int)nl, e->name);
            goto error;
        }
        if (mlu_add_overflow_u64(e->data_offset, e->csize, &end) || end > cd_off) {
            mlu_error_set(err, MLU_EFORMAT, (int64_t)e->data_offset, "zip entry '%.*s' runs past the end of the data (truncated file?)",
                          (int)nl, e->name);
            goto error;
        }
        z->sorted[i] = i;
        pos += CDH_SIZE + nl + xl + cl;
    }
    z->count = (size_t)count;
    mlu_sort_indices(z->sorted, z->count, cmp_names, z);
    for (i = 1; i < z->count; i++) {
        if (cmp_names(z, z->sorted[i - 1], z->sorted[i]) == 0) {
            const mlu_zip_entry *e = &z->entries[z->sorted[i]];
            mlu_error_set(err, MLU_EFORMAT, (int64_t)e->lfh_offset, "zip holds two records named '%.*s'", (int)e->name_len, e->name);
            goto error;
        }
    }
    if ((st = check_overlap(z, err)) != MLU_OK)
        goto error;
    st = MLU_OK;
    goto done;
error:
    mlu_zip_close(z);
done:
    mlu_free(tail);
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
