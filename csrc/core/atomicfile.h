/* atomicfile.h: write a file so that readers see the old one or the whole new
 * one, never a half-written one.
 *
 *   mlu_afile f;
 *   mlu_afile_open(&f, "ckpt.pt", &err);      sibling temp file, mode 0666 & ~umask
 *                                              (a replaced file's own permissions)
 *   mlu_afile_write(&f, p, n, &err) ...        (or pwrite through f.fd)
 *   mlu_afile_commit(&f, &err);                fsync, rename over the target, fsync the folder
 *   mlu_afile_abort(&f);                       on any failure: close and unlink the temp file
 *
 * commit and abort are each safe to call once; abort after commit is a no-op. */
#ifndef MLU_ATOMICFILE_H
#define MLU_ATOMICFILE_H

#include "../mlu.h"

typedef struct mlu_afile {
    int fd;             /* -1 when closed */
    char *target;       /* owned */
    char *tmp;          /* owned; NULL once renamed or removed */
    uint64_t written;   /* bytes written through mlu_afile_write */
} mlu_afile;

mlu_status mlu_afile_open(mlu_afile *f, const char *target, mlu_error *err);
mlu_status mlu_afile_write(mlu_afile *f, const void *p, size_t n, mlu_error *err);
mlu_status mlu_afile_commit(mlu_afile *f, mlu_error *err);
void mlu_afile_abort(mlu_afile *f);

/* Whole-file helpers. */
mlu_status mlu_write_file_atomic(const char *path, const void *p, size_t n, mlu_error *err);
/* Reads a whole file into a new buffer (free with mlu_free); a NUL is added
 * after the data but not counted in *len.  A regular file is read up to the
 * size fstat gives (open, fstat, read, close); other files to EOF. */
mlu_status mlu_read_file(const char *path, char **data, size_t *len, mlu_error *err);

#endif
