/* ptload_file.h: a PyTorch checkpoint (.pt/.pth) opened over bytes in memory.
 *
 * Detects the zip format (torch >= 1.6) and the legacy pickle-stream format,
 * runs the restricted pickle VM over the object pickle and resolves every
 * storage to its bytes in the file, checking sizes and bounds.  Pure C: the
 * binding turns the node tree into Python objects. */
#ifndef MLU_PTLOAD_FILE_H
#define MLU_PTLOAD_FILE_H

#include "../mlu.h"
#include "pickle_read.h"
#include "zipread.h"

enum mlu_pt_src { MLU_PT_SRC_STORED = 0, MLU_PT_SRC_DEFLATED, MLU_PT_SRC_RAW };

typedef struct mlu_pt_storage_src {
    int kind;                    /* mlu_pt_src */
    uint64_t offset;             /* file offset of the bytes (stored / raw) */
    const mlu_zip_entry *entry;  /* borrowed from zip (deflated) */
} mlu_pt_storage_src;

typedef struct mlu_pt {
    const uint8_t *data;         /* borrowed: the whole file */
    size_t size;
    int is_zip;
    int big_endian;              /* the file's byte order differs from little */
    mlu_zip zip;                 /* owned (zip format) */
    uint8_t *pickle_owned;       /* owned: an inflated data.pkl */
    mlu_pk_vm vm;                /* owned: nodes, tensors, storages */
    uint32_t root;               /* root node id */
    mlu_pt_storage_src *src;     /* owned: one per vm.storages entry */
} mlu_pt;

/* Parses and validates everything but the storage bytes themselves.  With
 * `verify`, data.pkl and every storage record are also checked in full
 * (deflate streams inflated, CRC-32 compared unless the file stores 0). */
mlu_status mlu_pt_open(mlu_pt *pt, const uint8_t *data, size_t size, int verify, mlu_error *err);
void mlu_pt_close(mlu_pt *pt);

/* 1 when storage i can be used in place (stored, native byte order, and its
 * file offset aligned to `align`). */
int mlu_pt_storage_in_place(const mlu_pt *pt, uint32_t i, size_t align);

/* Writes storage i's bytes (vm.storages[i].nbytes) into dst, inflating and
 * byte-swapping as needed.  With fd >= 0 (the same file) stored and raw
 * bytes are read with pread instead of copied from the mapping. */
mlu_status mlu_pt_storage_fill(const mlu_pt *pt, uint32_t i, uint8_t *dst, int fd, mlu_error *err);

/* Byte-swaps n bytes in place in units of `unit` bytes (1, 2, 4 or 8). */
void mlu_pt_byteswap(uint8_t *p, size_t n, int unit);

/* A private, writable (copy-on-write) mapping of a whole file. */
typedef struct mlu_file_map {
    uint8_t *data;
    size_t size;
} mlu_file_map;
mlu_status mlu_file_map_open(mlu_file_map *m, const char *path, mlu_error *err);
void mlu_file_map_close(mlu_file_map *m);

#endif
