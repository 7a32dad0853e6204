/* file.h: reading a file the same way for every format: open and check what
 * the path is, read at an offset, map privately, check the file is still
 * whole.  The .pt and safetensors readers both go through here, so the same
 * problem gives the same status and message for both.
 *
 *   int fd; uint64_t size; mlu_file_map m;
 *   mlu_file_open_ro(path, &fd, &size, &err);   a regular file, or an error
 *   mlu_file_read_at(fd, off, dst, n, "the header", &err);
 *   mlu_file_map_fd(&m, fd, size, &err);        private, copy-on-write
 *   mlu_file_check_size(fd, size, &err);        before handing out views
 *   mlu_file_map_close(&m); close(fd);
 *
 * What the path is.  Only a regular file is read.  A directory is MLU_EIO
 * with errno EISDIR (IsADirectoryError in Python); a FIFO, a character or
 * block device or a socket is MLU_EINVAL, "'path' is a FIFO, not a regular
 * file" (ValueError): such a file cannot be mapped or read at offsets, and a
 * FIFO is opened without waiting for a writer, so it never hangs.  An empty
 * file is opened (size 0): each format says what that means for it.
 *
 * A file that shrinks.  Reading a mapped page past the file's new end after
 * another process truncated it raises SIGBUS.  So the readers read every
 * byte they look at themselves (headers, copies) with mlu_file_read_at,
 * where a short read is MLU_EFORMAT "file shrank ...", and call
 * mlu_file_check_size (MLU_EFORMAT when the file is now shorter than when it
 * was opened) before giving out an array that views the mapping.  What is
 * left is torch.load(mmap=True)'s hazard: a file cut while such arrays are
 * alive makes touching their vanished pages raise SIGBUS. */
#ifndef MLU_FILE_H
#define MLU_FILE_H

#include "../mlu.h"

/* Opens path read-only; *fd (owned by the caller on success, -1 on failure)
 * and *size (from fstat).  Refuses what is not a regular file (see above). */
mlu_status mlu_file_open_ro(const char *path, int *fd, uint64_t *size, mlu_error *err);

/* Reads exactly n bytes at off (pread, retried on EINTR and short reads).
 * End of file first: MLU_EFORMAT "file shrank while reading <what>"
 * (callers check off + n against the size they were given before). */
mlu_status mlu_file_read_at(int fd, uint64_t off, void *dst, size_t n, const char *what, mlu_error *err);

/* MLU_OK while fd still has at least `size` bytes; MLU_EFORMAT "file shrank
 * from X to Y bytes ..." when it has fewer; MLU_EIO when fstat fails. */
mlu_status mlu_file_check_size(int fd, uint64_t size, mlu_error *err);

/* A private mapping: writable (copy-on-write), the file never changes. */
typedef struct mlu_file_map {
    uint8_t *data;  /* owned: the mapping; NULL when size is 0 */
    size_t size;
} mlu_file_map;

/* Maps the first `size` bytes of fd, as torch.load(mmap=True) does (size 0:
 * nothing mapped, data NULL). */
mlu_status mlu_file_map_fd(mlu_file_map *m, int fd, uint64_t size, mlu_error *err);
/* An anonymous private mapping of size bytes (zero-filled; size 0: data NULL). */
mlu_status mlu_file_map_anon(mlu_file_map *m, size_t size, mlu_error *err);
/* Unmaps (a zeroed or closed map is fine) and zeroes m. */
void mlu_file_map_close(mlu_file_map *m);

#endif
