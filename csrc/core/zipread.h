/* zipread.h: a reader of zip central directories over bytes in memory.
 *
 * Knows zip64 (EOCD64, locator and the 0x0001 extra), stored and deflated
 * records.  Every offset and size read from the file is bounds-checked against
 * the buffer; deflated output is capped at the declared size. */
#ifndef MLU_ZIPREAD_H
#define MLU_ZIPREAD_H

#include "../mlu.h"

typedef struct mlu_zip_entry {
    const char *name;      /* borrowed: points into the input buffer (not NUL-terminated) */
    size_t name_len;
    uint64_t lfh_offset;   /* local file header offset */
    uint64_t data_offset;  /* first byte of the (compressed) payload */
    uint64_t csize;        /* compressed size */
    uint64_t usize;        /* declared uncompressed size */
    uint32_t crc;
    uint16_t method;       /* 0 stored, 8 deflated */
    uint16_t flags;
} mlu_zip_entry;

typedef struct mlu_zip {
    const uint8_t *data;     /* borrowed: the whole file */
    size_t size;
    mlu_zip_entry *entries;  /* owned: in central-directory order */
    size_t count;
    size_t *sorted;          /* owned: entry indices sorted by name */
} mlu_zip;

/* Parses the end records and the central directory of data[0..size).  On
 * failure *z holds nothing to free.  Duplicate names are rejected. */
mlu_status mlu_zip_open(mlu_zip *z, const uint8_t *data, size_t size, mlu_error *err);
void mlu_zip_close(mlu_zip *z);

/* Borrowed entry named name[0..len), or NULL. */
const mlu_zip_entry *mlu_zip_find(const mlu_zip *z, const char *name, size_t len);

/* Writes the record's uncompressed bytes to dst, which holds exactly e->usize
 * bytes.  Stored records are copied; deflated ones must inflate to exactly
 * e->usize bytes (never more is written). */
mlu_status mlu_zip_extract(const mlu_zip *z, const mlu_zip_entry *e, uint8_t *dst, mlu_error *err);

/* Checks a record without keeping its bytes: a deflated one must decompress
 * to exactly e->usize bytes; and the CRC-32 of the uncompressed bytes must
 * match the directory's unless that CRC is 0 (torch can write files with
 * CRCs turned off, and then stores 0). */
mlu_status mlu_zip_check(const mlu_zip *z, const mlu_zip_entry *e, mlu_error *err);

#endif
