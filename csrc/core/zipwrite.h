/* zipwrite.h: a zip writer laid out exactly like PyTorch's (miniz with
 * zip64 on), so torch.load, torch's mmap loader and its computed storage
 * offsets all find the records where they expect them.
 *
 * Every record is STORED.  Local header: version 0, flags 0x0808 (data
 * descriptor + UTF-8; 0x0800 for an empty record), time/date 0, CRC and sizes
 * 0; the name is "<archive>/<record>"; the extra field holds an optional zip64
 * field and then the "FB" padding field that puts the payload on a multiple
 * of `alignment`.  After a non-empty payload comes a data descriptor (16
 * bytes, or 24 when the record needed zip64).  The archive ends with the
 * central directory, a zip64 end record, its locator and the classic end
 * record, always.
 *
 *   mlu_zipw w;
 *   mlu_zipw_init(&w, "model", sink, ctx, &err);
 *   mlu_zipw_record(&w, "data.pkl", p, n, &err);           whole record
 *   mlu_zipw_begin(&w, "data/0", size, &err);               or streamed:
 *   mlu_zipw_data(&w, p, n, &err) ...                       exactly `size` bytes
 *   mlu_zipw_end(&w, &err);
 *   mlu_zipw_finish(&w, &err);
 *   mlu_zipw_free(&w);
 *
 * Nothing is buffered beyond one header: bytes go to the sink as they come. */
#ifndef MLU_ZIPWRITE_H
#define MLU_ZIPWRITE_H

#include "../mlu.h"

/* Where the bytes go: returns MLU_OK or sets err. */
typedef mlu_status (*mlu_zipw_sink)(void *ctx, const void *p, size_t n, mlu_error *err);

#define MLU_ZIP_ALIGNMENT 64u
#define MLU_ZIP64_LIMIT 0xFFFFFFFFull

typedef struct mlu_zipw_entry {
    char *name;        /* owned: the full name, prefix included */
    size_t name_len;
    uint64_t offset;   /* of the local header */
    uint64_t size;
    uint32_t crc;
    uint16_t flags;
} mlu_zipw_entry;

typedef struct mlu_zipw {
    mlu_zipw_sink sink;
    void *sink_ctx;            /* borrowed */
    char *prefix;              /* owned: "<archive>/" */
    size_t prefix_len;
    uint64_t pos;              /* bytes handed to the sink so far */
    mlu_zipw_entry *entries;   /* owned */
    size_t count, cap;
    uint32_t alignment;        /* MLU_ZIP_ALIGNMENT */
    uint64_t zip64_limit;      /* MLU_ZIP64_LIMIT; tests lower it to reach the zip64 paths */
    /* the open record */
    int open;
    uint64_t remaining;
    uint32_t crc;
    int failed;                /* a sink failed: the archive is unusable */
} mlu_zipw;

/* `archive` is the folder name every record goes under (no slash; not empty). */
mlu_status mlu_zipw_init(mlu_zipw *w, const char *archive, mlu_zipw_sink sink, void *ctx,
                         mlu_error *err);
mlu_status mlu_zipw_begin(mlu_zipw *w, const char *name, uint64_t size, mlu_error *err);
mlu_status mlu_zipw_data(mlu_zipw *w, const void *p, size_t n, mlu_error *err);
/* The whole payload of the open record in one call; for large payloads the
 * CRC is computed on a second thread while the bytes go to the sink (the
 * sink then must not touch what the thread reads, which it never does). */
mlu_status mlu_zipw_payload(mlu_zipw *w, const void *p, size_t n, mlu_error *err);
mlu_status mlu_zipw_end(mlu_zipw *w, mlu_error *err);
mlu_status mlu_zipw_record(mlu_zipw *w, const char *name, const void *p, size_t n, mlu_error *err);
mlu_status mlu_zipw_finish(mlu_zipw *w, mlu_error *err);
void mlu_zipw_free(mlu_zipw *w);

/* The length of the "FB" padding payload (not counting its 4-byte header)
 * for a record whose local header starts at `offset` with a full name of
 * `name_len` bytes and `size` bytes of data (torch's getPadding). */
uint32_t mlu_zip_padding(uint64_t offset, size_t name_len, uint64_t size, uint32_t alignment,
                         uint64_t zip64_limit);

/* CRC-32 (zip's) of n bytes, continuing from crc (start with 0). */
uint32_t mlu_crc32(uint32_t crc, const void *p, size_t n);

#endif
