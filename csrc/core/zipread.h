/* zipread.h: a reader of zip central directories.
 *
 * Knows zip64 (EOCD64, locator and the 0x0001 extra), stored and deflated
 * records.  The input is either bytes in memory or a file descriptor read
 * with pread (never through a mapping: a file truncated by another process
 * while it is read gives an error, not SIGBUS).  Every offset and size read
 * from the file is bounds-checked against the input size (fstat's, for a
 * file); a short read is reported as a truncated file; deflated output is
 * capped at the declared size. */
#ifndef MLU_ZIPREAD_H
#define MLU_ZIPREAD_H

#include "../mlu.h"

/* Where bytes come from: memory, or a file read with pread. */
typedef struct mlu_rd {
    const uint8_t *mem;    /* borrowed: the whole input, or NULL to read fd */
    int fd;                /* borrowed: used when mem is NULL */
    uint64_t size;         /* input size (for a file: what fstat reported) */
} mlu_rd;

/* A source of bytes in memory.  The binding reads files (mlu_rd_fd); the C
 * tests and the fuzz harnesses (pt_zip, pt_pickle, pt_write) read archives
 * they built in memory through this, so the reader is tested without files. */
void mlu_rd_mem(mlu_rd *r, const uint8_t *data, size_t size);
void mlu_rd_fd(mlu_rd *r, int fd, uint64_t size);

/* Copies bytes [off, off + n) into dst.  Bytes past r->size, or a file that
 * has become shorter (a short pread), give MLU_EFORMAT naming `what` and the
 * byte offset; a failing read gives MLU_EIO. */
mlu_status mlu_rd_read(const mlu_rd *r, uint64_t off, void *dst, size_t n, const char *what, mlu_error *err);

typedef struct mlu_zip_entry {
    const char *name;      /* borrowed: points into the directory copy z->cd (not NUL-terminated) */
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
    mlu_rd rd;               /* the input (borrows its memory or fd) */
    uint8_t *cd;             /* owned: a copy of the central directory */
    mlu_zip_entry *entries;  /* owned: in central-directory order */
    size_t count;
    size_t *sorted;          /* owned: entry indices sorted by name */
} mlu_zip;

/* Parses the end records, the central directory and every local header of
 * the input (all copied into owned buffers; *rd is copied and its memory or
 * fd must outlive z).  On failure *z holds nothing to free.  Duplicate names,
 * and records whose bytes overlap (local header through payload), are
 * rejected. */
mlu_status mlu_zip_open(mlu_zip *z, const mlu_rd *rd, mlu_error *err);
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
