/* zipwrite.c: torch-layout zip writer (see zipwrite.h for the layout). */
#include "zipwrite.h"
#include "alloc.h"
#include "zipfmt.h"

#include <pthread.h>
#include <string.h>
#include <zlib.h>

#define LFH_SIG MLU_ZIP_LFH_SIG
#define CDH_SIG MLU_ZIP_CDH_SIG
#define DD_SIG MLU_ZIP_DD_SIG
#define EOCD64_SIG MLU_ZIP_EOCD64_SIG
#define LOC64_SIG MLU_ZIP_LOC64_SIG
#define EOCD_SIG MLU_ZIP_EOCD_SIG
#define FLAG_DESCRIPTOR MLU_ZIP_FLAG_DESCRIPTOR
#define FLAG_UTF8 MLU_ZIP_FLAG_UTF8
#define LFH_SIZE MLU_ZIP_LFH_SIZE
#define CDH_SIZE MLU_ZIP_CDH_SIZE

uint32_t mlu_crc32(uint32_t crc, const void *p, size_t n)
{
    const unsigned char *c = p;
    uLong v = crc;

    while (n > 0) {
        uInt chunk = n > (1u << 30) ? (1u << 30) : (uInt)n;
        v = crc32(v, c, chunk);
        c += chunk;
        n -= chunk;
    }
    return (uint32_t)v;
}

static void put16(unsigned char *p, uint16_t v)
{
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
}

static void put32(unsigned char *p, uint32_t v)
{
    put16(p, (uint16_t)v);
    put16(p + 2, (uint16_t)(v >> 16));
}

static void put64(unsigned char *p, uint64_t v)
{
    put32(p, (uint32_t)v);
    put32(p + 4, (uint32_t)(v >> 32));
}

/* A 32-bit field for v: the value, or 0xFFFFFFFF when it lives in a zip64 record. */
static uint32_t field32(const mlu_zipw *w, uint64_t v)
{
    return v >= w->zip64_limit ? 0xFFFFFFFFu : (uint32_t)v;
}

uint32_t mlu_zip_padding(uint64_t offset, size_t name_len, uint64_t size, uint32_t alignment,
                         uint64_t zip64_limit)
{
    uint64_t start = offset + LFH_SIZE + (uint64_t)name_len + 4;

    if (size >= zip64_limit || offset >= zip64_limit) {
        start += 4;
        if (size >= zip64_limit)
            start += 16;
        if (offset >= zip64_limit)
            start += 8;
    }
    if (alignment <= 1)
        return 0;
    return (uint32_t)((alignment - start % alignment) % alignment);
}

static mlu_status emit(mlu_zipw *w, const void *p, size_t n, mlu_error *err)
{
    mlu_status st;

    if (w->failed)
        return mlu_error_set(err, MLU_EINVAL, -1, "zip writer: an earlier write failed");
    if (n == 0)
        return MLU_OK;
    st = w->sink(w->sink_ctx, p, n, err);
    if (st != MLU_OK) {
        w->failed = 1;
        return st;
    }
    w->pos += n;
    return MLU_OK;
}

mlu_status mlu_zipw_init(mlu_zipw *w, const char *archive, mlu_zipw_sink sink, void *ctx,
                         mlu_error *err)
{
    size_t n = strlen(archive);

    memset(w, 0, sizeof(*w));
    w->sink = sink;
    w->sink_ctx = ctx;
    w->alignment = MLU_ZIP_ALIGNMENT;
    w->zip64_limit = MLU_ZIP64_LIMIT;
    if (n == 0 || n > 0x7FFF)
        return mlu_error_set(err, MLU_EINVAL, -1, "zip writer: archive name must be 1 to 32767 bytes");
    w->prefix = mlu_malloc(n + 2);
    if (w->prefix == NULL)
        return mlu_error_set(err, MLU_ENOMEM, -1, "out of memory");
    memcpy(w->prefix, archive, n);
    w->prefix[n] = '/';
    w->prefix[n + 1] = '\0';
    w->prefix_len = n + 1;
    return MLU_OK;
}

void mlu_zipw_free(mlu_zipw *w)
{
    size_t i;

    for (i = 0; i < w->count; i++)
        mlu_free(w->entries[i].name);
    mlu_free(w->entries);
    mlu_free(w->prefix);
    w->entries = NULL;
    w->prefix = NULL;
    w->count = w->cap = 0;
}

mlu_status mlu_zipw_begin(mlu_zipw *w, const char *name, uint64_t size, mlu_error *err)
{
    mlu_status st = MLU_EINVAL;
    unsigned char hdr[LFH_SIZE + 4 + 24 + 4 + 256];
    size_t rec_len = strlen(name), full_len, h = 0;
    uint64_t off = w->pos;
    uint32_t pad;
    uint16_t extra_len;
    int need64 = size >= w->zip64_limit || off >= w->zip64_limit;
    mlu_zipw_entry *e;

    if (w->open)
        return mlu_error_set(err, MLU_EINVAL, -1, "zip writer: record '%s' begun inside another", name);
    if (w->alignment > 256)
        return mlu_error_set(err, MLU_EINVAL, -1, "zip writer: alignment above 256");
    if (mlu_add_overflow_size(w->prefix_len, rec_len, &full_len) || full_len > 0xFFFF)
        return mlu_error_set(err, MLU_EINVAL, -1, "zip writer: record name '%s' is too long", name);
    if (w->count == w->cap) {
        st = mlu_grow((void **)&w->entries, &w->cap, w->count + 1, sizeof(*w->entries), SIZE_MAX,
                      "zip writer records", err);
        if (st != MLU_OK)
            return st;
    }
    e = &w->entries[w->count];
    e->name = mlu_malloc(full_len + 1);
    if (e->name == NULL)
        return mlu_error_set(err, MLU_ENOMEM, -1, "out of memory");
    memcpy(e->name, w->prefix, w->prefix_len);
    memcpy(e->name + w->prefix_len, name, rec_len + 1);
    e->name_len = full_len;
    e->offset = off;
    e->size = size;
    e->crc = 0;
    e->flags = (uint16_t)(FLAG_UTF8 | (size > 0 ? FLAG_DESCRIPTOR : 0));
    w->count++;

    pad = mlu_zip_padding(off, full_len, size, w->alignment, w->zip64_limit);
    extra_len = (uint16_t)(4 + pad);
    if (need64)
        extra_len = (uint16_t)(extra_len + 4 + (size >= w->zip64_limit ? 16 : 0)
                               + (off >= w->zip64_limit ? 8 : 0));
    memset(hdr, 0, LFH_SIZE);
    put32(hdr, LFH_SIG);
    put16(hdr + 6, e->flags);
    put16(hdr + 26, (uint16_t)full_len);
    put16(hdr + 28, extra_len);
    st = emit(w, hdr, LFH_SIZE, err);
    if (st == MLU_OK)
        st = emit(w, e->name, full_len, err);
    if (st != MLU_OK)
        return st;
    if (need64) {
        /* miniz writes the sizes it knows when the header goes out: the
         * uncompressed size, and 0 for the compressed one. */
        uint16_t fs = (uint16_t)((size >= w->zip64_limit ? 16 : 0) + (off >= w->zip64_limit ? 8 : 0));
        put16(hdr + h, 0x0001);
        put16(hdr + h + 2, fs);
        h += 4;
        if (size >= w->zip64_limit) {
            put64(hdr + h, size);
            put64(hdr + h + 8, 0);
            h += 16;
        }
        if (off >= w->zip64_limit) {
            put64(hdr + h, off);
            h += 8;
        }
    }
    hdr[h++] = 'F';
    hdr[h++] = 'B';
    put16(hdr + h, (uint16_t)pad);
    h += 2;
    memset(hdr + h, 'Z', pad);
    h += pad;
    st = emit(w, hdr, h, err);
    if (st != MLU_OK)
        return st;
    w->open = 1;
    w->remaining = size;
    w->crc = 0;
    return MLU_OK;
}

mlu_status mlu_zipw_data(mlu_zipw *w, const void *p, size_t n, mlu_error *err)
{
    const char *c = p;

    if (!w->open)
        return mlu_error_set(err, MLU_EINVAL, -1, "zip writer: data outside a record");
    if ((uint64_t)n > w->remaining)
        return mlu_error_set(err, MLU_EINVAL, -1,
                             "zip writer: record '%s' got more bytes than announced",
                             w->entries[w->count - 1].name);
    /* CRC a slice while it is hot in cache, then hand it to the sink. */
    while (n > 0) {
        size_t chunk = n > ((size_t)1 << 21) ? ((size_t)1 << 21) : n;
        mlu_status st;
        w->crc = mlu_crc32(w->crc, c, chunk);
        st = emit(w, c, chunk, err);
        if (st != MLU_OK)
            return st;
        c += chunk;
        n -= chunk;
        w->remaining -= chunk;
    }
    return MLU_OK;
}

typedef struct crc_job {
    const void *p;
    size_t n;
    uint32_t crc;
} crc_job;

static void *crc_thread(void *arg)
{
    crc_job *job = arg;
    job->crc = mlu_crc32(0, job->p, job->n);
    return NULL;
}

#define PARALLEL_CRC_MIN ((size_t)8 << 20)

mlu_status mlu_zipw_payload(mlu_zipw *w, const void *p, size_t n, mlu_error *err)
{
    crc_job job = {p, n, 0};
    pthread_t th;
    const char *c = p;
    mlu_status st = MLU_OK;

    if (!w->open || (uint64_t)n != w->remaining || w->crc != 0 || n < PARALLEL_CRC_MIN
        || pthread_create(&th, NULL, crc_thread, &job) != 0)
        return mlu_zipw_data(w, p, n, err);
    while (n > 0 && st == MLU_OK) {
        size_t chunk = n > ((size_t)1 << 24) ? ((size_t)1 << 24) : n;
        st = emit(w, c, chunk, err);
        c += chunk;
        n -= chunk;
    }
    pthread_join(th, NULL);
    if (st == MLU_OK) {
        w->remaining = 0;
        w->crc = job.crc;
    }
    return st;
}

mlu_status mlu_zipw_end(mlu_zipw *w, mlu_error *err)
{
    unsigned char dd[24];
    mlu_zipw_entry *e;
    size_t n = 16;

    if (!w->open)
        return mlu_error_set(err, MLU_EINVAL, -1, "zip writer: no record is open");
    e = &w->entries[w->count - 1];
    if (w->remaining != 0)
        return mlu_error_set(err, MLU_EINVAL, -1,
                             "zip writer: record '%s' is %llu bytes short", e->name,
                             (unsigned long long)w->remaining);
    w->open = 0;
    e->crc = w->crc;
    if (e->size == 0)
        return MLU_OK;
    put32(dd, DD_SIG);
    put32(dd + 4, e->crc);
    if (e->size >= w->zip64_limit || e->offset >= w->zip64_limit) {
        put64(dd + 8, e->size);
        put64(dd + 16, e->size);
        n = 24;
    } else {
        put32(dd + 8, (uint32_t)e->size);
        put32(dd + 12, (uint32_t)e->size);
    }
    return emit(w, dd, n, err);
}

mlu_status mlu_zipw_record(mlu_zipw *w, const char *name, const void *p, size_t n, mlu_error *err)
{
    mlu_status st = mlu_zipw_begin(w, name, (uint64_t)n, err);
    if (st == MLU_OK)
        st = mlu_zipw_data(w, p, n, err);
    if (st == MLU_OK)
        st = mlu_zipw_end(w, err);
    return st;
}

mlu_status mlu_zipw_finish(mlu_zipw *w, mlu_error *err)
{
    unsigned char h[CDH_SIZE + 28];
    uint64_t cd_start = w->pos, cd_size;
    size_t i;
    mlu_status st = MLU_OK;

    if (w->open)
        return mlu_error_set(err, MLU_EINVAL, -1, "zip writer: a record is still open");
    for (i = 0; i < w->count && st == MLU_OK; i++) {
        const mlu_zipw_entry *e = &w->entries[i];
        int big = e->size >= w->zip64_limit, far = e->offset >= w->zip64_limit;
        size_t x = CDH_SIZE;
        uint16_t extra = (uint16_t)((big || far) ? 4 + (big ? 16 : 0) + (far ? 8 : 0) : 0);

        memset(h, 0, CDH_SIZE);
        put32(h, CDH_SIG);
        put16(h + 8, e->flags);
        put32(h + 16, e->crc);
        put32(h + 20, field32(w, e->size));
        put32(h + 24, field32(w, e->size));
        put16(h + 28, (uint16_t)e->name_len);
        put16(h + 30, extra);
        put32(h + 42, field32(w, e->offset));
        st = emit(w, h, CDH_SIZE, err);
        if (st == MLU_OK)
            st = emit(w, e->name, e->name_len, err);
        if (st != MLU_OK || extra == 0)
            continue;
        x = 0;
        put16(h, 0x0001);
        put16(h + 2, (uint16_t)(extra - 4));
        x = 4;
        if (big) {
            put64(h + x, e->size);
            put64(h + x + 8, e->size);
            x += 16;
        }
        if (far) {
            put64(h + x, e->offset);
            x += 8;
        }
        st = emit(w, h, x, err);
    }
    if (st != MLU_OK)
        return st;
    cd_size = w->pos - cd_start;
    {
        unsigned char t[MLU_ZIP_EOCD64_SIZE + MLU_ZIP_LOC64_SIZE + MLU_ZIP_EOCD_SIZE];
        uint64_t eocd64 = w->pos;
        memset(t, 0, sizeof(t));
        put32(t, EOCD64_SIG);
        put64(t + 4, 44);
        put16(t + 12, 0x031E);
        put16(t + 14, 0x002D);
        put64(t + 24, (uint64_t)w->count);
        put64(t + 32, (uint64_t)w->count);
        put64(t + 40, cd_size);
        put64(t + 48, cd_start);
        put32(t + MLU_ZIP_EOCD64_SIZE, LOC64_SIG);
        put64(t + 64, eocd64);
        put32(t + 72, 1);
        put32(t + MLU_ZIP_EOCD64_SIZE + MLU_ZIP_LOC64_SIZE, EOCD_SIG);
        put16(t + 84, (uint16_t)(w->count > 0xFFFF ? 0xFFFF : w->count));
        put16(t + 86, (uint16_t)(w->count > 0xFFFF ? 0xFFFF : w->count));
        put32(t + 88, field32(w, cd_size));
        put32(t + 92, field32(w, cd_start));
        st = emit(w, t, sizeof(t), err);
    }
    return st;
}
