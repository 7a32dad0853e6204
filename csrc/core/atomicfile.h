/* atomicfile.h: write a file so that readers see the old one or the whole new
 * one, never a half-written one.
 *
 *   mlu_afile f;
 *   mlu_afile_open(&f, "ckpt.pt", MLU_AFILE_DURABLE, &err);
 *                                              sibling temp file, mode 0666 & ~umask
 *                                              (a replaced file's own permissions)
 *   mlu_afile_write(&f, p, n, &err) ...        the only way in: it keeps `written` and
 *                                              the writeback pacing (see below)
 *   mlu_afile_commit(&f, &err);                fsync, rename over the target, fsync the folder
 *   mlu_afile_abort(&f);                       on any failure: close and unlink the temp file
 *
 * commit and abort are each safe to call once; abort after commit is a no-op.
 *
 * Durability.  With MLU_AFILE_DURABLE the commit fsyncs the temp file before
 * the rename and the folder after it, so a committed file survives a power
 * loss, and mlu_afile_write starts the kernel's writeback of every
 * MLU_AFILE_WRITEBACK_STEP bytes as they are written (sync_file_range), so
 * the fsync at commit finds most of the file already on its way to the
 * disk.  Without it (flags 0) the commit only renames: the write is still
 * atomic (readers and a crashed or killed writer never leave a half-written
 * target, and the temp files are locked and reaped alike), but after a power
 * loss or an OS crash the target may be the old file or, on some
 * filesystems, empty or short.  A FIFO or device written in place is flushed
 * either way.
 *
 * What is replaced.  Only a regular file (or a missing one) is replaced
 * atomically.  A symbolic link is followed, as open() follows it.  A FIFO or
 * a device (character or block) is written in place, as open(path, "w")
 * writes it: no temp file, nothing renamed over the node, no atomicity
 * (f.direct is 1; pwrite may not work there).  A socket cannot be opened and
 * a folder cannot be replaced: both are errors before anything is written.
 *
 * Temporary files and their reaping.  The temp file of target "dir/name" is
 * "dir/.NAME.XXXXXX.tmp": NAME is name cut to its first 200 bytes and
 * XXXXXX six characters of [A-Za-z0-9] (mkstemp's).  The writer holds an
 * exclusive flock() on its temp file from creation until the rename or the
 * unlink (a killed writer's lock goes with it), and checks once it holds the
 * lock that the name still is its file (else it starts again with a new
 * name).  mlu_afile_open first reaps the stale temp files of the same target:
 * every entry of the folder with exactly that name pattern that is a regular
 * file (not a link) owned by the same user, on which a non-blocking flock()
 * succeeds, and whose name still refers to the file locked, is unlinked.  So
 * a live writer's temp file is never taken (it holds the lock, or loses its
 * name before it has written anything and starts again), and a killed save
 * costs disk space only until the next save of the same target.  Where
 * flock() is refused (some network filesystems) nothing is reaped.  Two
 * targets whose names agree on their first 200 bytes share the pattern (a
 * stale file of either is reaped by both).  Writers that do not take the
 * lock (versions before it) can lose their temp file to a reaper: their
 * save then fails, it never lands half-written. */
#ifndef MLU_ATOMICFILE_H
#define MLU_ATOMICFILE_H

#include "../mlu.h"

/* Flags of mlu_afile_open and mlu_write_file_atomic (bits; 0: none). */
typedef enum mlu_afile_flags {
    MLU_AFILE_DURABLE = 1u << 0 /* fsync the file before the rename, the folder after it */
} mlu_afile_flags;

#define MLU_AFILE_ALL_FLAGS ((unsigned)MLU_AFILE_DURABLE)

/* Durable writes start writeback every this many bytes.  32 MiB (the .pt
 * writer used 64, the safetensors writer 32): the fsync at commit then waits
 * for at most one step not yet handed to the disk plus what is in flight
 * (some 15-30 ms of a 1-2 GB/s NVMe drive), the dirty pages a save holds stay
 * far below the kernel's own background threshold (10% of memory), and 32
 * calls per GiB cost nothing next to the copy.  A step of a few MiB would cut
 * the disk's work into small requests; on a fast disk 32 and 64 MiB measure
 * alike (a 768 MiB write: commit 0.15 s either way, 0.34 s unpaced), so the
 * smaller tail wins on slower ones. */
#define MLU_AFILE_WRITEBACK_STEP ((uint64_t)32 << 20)

typedef struct mlu_afile {
    int fd;             /* -1 when closed */
    char *target;       /* owned */
    char *tmp;          /* owned; NULL once renamed or removed, and when direct */
    int direct;         /* 1: a FIFO or device written in place (no temp file) */
    unsigned flags;     /* mlu_afile_flags given to mlu_afile_open */
    uint64_t written;   /* bytes written through mlu_afile_write */
    uint64_t flushed;   /* of those, bytes whose writeback was started (durable only;
                           a multiple of MLU_AFILE_WRITEBACK_STEP) */
} mlu_afile;

/* flags: MLU_AFILE_DURABLE or 0; an unknown bit is MLU_EINVAL. */
mlu_status mlu_afile_open(mlu_afile *f, const char *target, unsigned flags, mlu_error *err);
/* Appends n bytes (write, retried on EINTR and short writes); durable:
 * starts writeback at each MLU_AFILE_WRITEBACK_STEP boundary crossed. */
mlu_status mlu_afile_write(mlu_afile *f, const void *p, size_t n, mlu_error *err);
mlu_status mlu_afile_commit(mlu_afile *f, mlu_error *err);
void mlu_afile_abort(mlu_afile *f);

/* Whole-file helpers. */
mlu_status mlu_write_file_atomic(const char *path, const void *p, size_t n, unsigned flags,
                                 mlu_error *err);
/* Reads a whole file into a new buffer (free with mlu_free); a NUL is added
 * after the data but not counted in *len.  A regular file is read up to the
 * size fstat gives (open, fstat, read, close); other files to EOF. */
mlu_status mlu_read_file(const char *path, char **data, size_t *len, mlu_error *err);

#endif
