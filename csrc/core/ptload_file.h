/* ptload_file.h: a PyTorch checkpoint (.pt/.pth) read from memory or a file.
 *
 * Detects the zip format (torch >= 1.6) and the legacy pickle-stream format,
 * runs the restricted pickle VM over the object pickle and resolves every
 * storage to its bytes in the file, checking sizes and bounds.  Pure C: the
 * binding turns the node tree into Python objects.
 *
 * From a file, every byte the parser looks at (end records, central
 * directory, local headers, data.pkl, small records, legacy pickles and
 * counts) is read with pread into owned buffers and checked against the size
 * fstat reported, so a file truncated by another process during the load
 * gives MLU_EFORMAT, never SIGBUS.  Only tensor payloads may be used through
 * a mapping (mlu_file_map of file.h), by the caller's choice. */
#ifndef MLU_PTLOAD_FILE_H
#define MLU_PTLOAD_FILE_H

#include "../mlu.h"
#include "file.h"
#include "pickle_read.h"
#include "zipread.h"

enum mlu_pt_src { MLU_PT_SRC_STORED = 0, MLU_PT_SRC_DEFLATED, MLU_PT_SRC_RAW };

typedef struct mlu_pt_storage_src {
    int kind;                    /* mlu_pt_src */
    uint64_t offset;             /* file offset of the bytes (stored / raw) */
    const mlu_zip_entry *entry;  /* borrowed from zip (deflated) */
} mlu_pt_storage_src;

typedef struct mlu_pt {
    mlu_rd rd;                   /* the input (borrows its memory or fd) */
    int is_zip;
    int big_endian;              /* the file's byte order differs from little */
    mlu_zip zip;                 /* owned (zip format) */
    uint8_t *pickle_owned;       /* owned: data.pkl (zip) or the file's head (legacy); pickle strings point here */
    mlu_pk_vm vm;                /* owned: nodes, tensors, storages */
    uint32_t root;               /* root node id */
    mlu_pt_storage_src *src;     /* owned: one per vm.storages entry */
} mlu_pt;

/* Parses and validates everything but the storage bytes themselves.  With
 * `verify`, data.pkl and every storage record are also checked in full
 * (deflate streams inflated, CRC-32 compared unless the file stores 0).
 * *rd is copied; its memory or fd must outlive pt. */
mlu_status mlu_pt_open(mlu_pt *pt, const mlu_rd *rd, int verify, mlu_error *err);
void mlu_pt_close(mlu_pt *pt);

/* 1 when storage i can be used in place (stored, native byte order, and its
 * file offset a multiple of `align`, so aligned in a page-aligned mapping). */
int mlu_pt_storage_in_place(const mlu_pt *pt, uint32_t i, size_t align);

/* Writes storage i's bytes (vm.storages[i].nbytes) into dst, inflating and
 * byte-swapping as needed (read with pread from a file: a file that shrank
 * gives MLU_EFORMAT). */
mlu_status mlu_pt_storage_fill(const mlu_pt *pt, uint32_t i, uint8_t *dst, mlu_error *err);

/* Byte-swaps n bytes in place in units of `unit` bytes (1, 2, 4 or 8). */
void mlu_pt_byteswap(uint8_t *p, size_t n, int unit);

#endif
