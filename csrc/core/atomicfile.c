/* atomicfile.c: sibling temp file, fsync, rename, fsync the folder (the
 * fsyncs only with MLU_AFILE_DURABLE; see atomicfile.h for what is replaced
 * and how stale temp files are reaped). */
#define _GNU_SOURCE
#include "atomicfile.h"
#include "alloc.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

static char *dup_str(const char *s)
{
    size_t n = strlen(s) + 1;
    char *p = mlu_malloc(n);
    if (p != NULL)
        memcpy(p, s, n);
    return p;
}

/* The folder part of `path` ("." when there is none), new buffer. */
static char *dir_of(const char *path)
{
    const char *slash = strrchr(path, '/');
    char *d;
    size_t n;

    if (slash == NULL)
        return dup_str(".");
    n = (slash == path) ? 1 : (size_t)(slash - path);
    d = mlu_malloc(n + 1);
    if (d != NULL) {
        memcpy(d, path, n);
        d[n] = '\0';
    }
    return d;
}

static mode_t current_umask(void)
{
    /* Read it where Linux reports it (>= 4.7): umask() can only read it by
     * setting it, which would change it meanwhile for every thread (a file
     * another thread creates then gets 0644 under a 077 umask). */
    FILE *f = fopen("/proc/self/status", "re");
    char line[256];
    unsigned int v;
    mode_t m = 0;
    int found = 0;

    if (f != NULL) {
        while (!found && fgets(line, sizeof(line), f) != NULL) {
            if (strncmp(line, "Umask:", 6) == 0 && sscanf(line + 6, "%o", &v) == 1) {
                m = (mode_t)(v & 0777);
                found = 1;
            }
        }
        fclose(f);
    }
    if (!found) {
        /* older kernels: the racy way is the only one */
        m = umask(022);
        umask(m);
    }
    return m;
}

#define TMP_BASE 200
#define TMP_RANDOM 6    /* the XXXXXX of mkostemps */
#define TMP_TRIES 100   /* temp names lost to a reaper before giving up */

static int is_tmp_char(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
}

/* 1 when `name` is a temp file name of a target named `base` (see
 * atomicfile.h): "." base[:TMP_BASE] "." XXXXXX ".tmp". */
static int is_temp_name(const char *name, const char *base)
{
    size_t nb = strlen(base), i;

    if (nb > TMP_BASE)
        nb = TMP_BASE;
    if (strlen(name) != 1 + nb + 1 + TMP_RANDOM + 4 || name[0] != '.'
        || strncmp(name + 1, base, nb) != 0 || name[1 + nb] != '.')
        return 0;
    name += 1 + nb + 1;
    for (i = 0; i < TMP_RANDOM; i++)
        if (!is_tmp_char(name[i]))
            return 0;
    return strcmp(name + TMP_RANDOM, ".tmp") == 0;
}

/* Best effort, never an error: unlinks the temp files of `base` in `dir`
 * that no live writer holds (the rules are in atomicfile.h).  Works through
 * the folder's descriptor, so no path is built and nothing is allocated
 * here (readdir's buffer is libc's). */
static void reap_stale(const char *dir, const char *base)
{
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    DIR *d = dfd >= 0 ? fdopendir(dfd) : NULL; /* owns dfd once made */
    struct dirent *de;
    uid_t me = geteuid();

    if (d == NULL)
        goto done;
    while ((de = readdir(d)) != NULL) {
        struct stat held, named;
        int fd;

        /* only our own regular files are opened at all (opening a device
         * can do things); O_NOFOLLOW and O_NONBLOCK for whatever might
         * replace one meanwhile */
        if (!is_temp_name(de->d_name, base) || fstatat(dfd, de->d_name, &named, AT_SYMLINK_NOFOLLOW) != 0
            || !S_ISREG(named.st_mode) || named.st_uid != me)
            continue;
        fd = openat(dfd, de->d_name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
        if (fd < 0 && errno == EACCES)
            fd = openat(dfd, de->d_name, O_WRONLY | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
        if (fd < 0)
            continue;
        /* locked by nobody, and the name still is that file: stale */
        if (fstat(fd, &held) == 0 && S_ISREG(held.st_mode) && held.st_uid == me
            && flock(fd, LOCK_EX | LOCK_NB) == 0
            && fstatat(dfd, de->d_name, &named, AT_SYMLINK_NOFOLLOW) == 0
            && named.st_dev == held.st_dev && named.st_ino == held.st_ino)
            (void)unlinkat(dfd, de->d_name, 0);
        close(fd); /* releases the lock */
    }
done:
    if (d != NULL)
        closedir(d); /* closes dfd */
    else if (dfd >= 0)
        close(dfd);
}

/* Takes the writer's lock on its new temp file.  1 when the name `tmp`
 * still refers to the file `fd` once locked (or locks are refused here: no
 * reaper can take it then either), 0 when a reaper unlinked it first. */
static int lock_own_temp(int fd, const char *tmp)
{
    struct stat held, named;

    while (flock(fd, LOCK_EX) != 0) {
        if (errno != EINTR)
            return 1;
    }
    if (fstat(fd, &held) != 0)
        return 1; /* cannot tell: the rename will say */
    return lstat(tmp, &named) == 0 && named.st_dev == held.st_dev && named.st_ino == held.st_ino;
}

/* A FIFO or device: opened for writing in place, as open() would. */
static mlu_status open_direct(mlu_afile *f, const char *target, mlu_error *err)
{
    mlu_status st = MLU_ENOMEM;
    struct stat sb;

    f->target = dup_str(target);
    if (f->target == NULL) {
        st = mlu_error_set(err, MLU_ENOMEM, -1, "out of memory");
        goto done;
    }
    f->fd = open(target, O_WRONLY | O_NOCTTY | O_CLOEXEC);
    if (f->fd < 0) {
        st = mlu_error_errno(err, errno, "cannot open '%s' for writing", target);
        goto done;
    }
    if (fstat(f->fd, &sb) != 0) {
        st = mlu_error_errno(err, errno, "cannot stat '%s'", target);
        goto done;
    }
    if (S_ISREG(sb.st_mode) || S_ISDIR(sb.st_mode)) {
        /* replaced since it was looked at: not ours to judge, say so */
        st = mlu_error_errno(err, EAGAIN, "'%s' changed while it was being opened", target);
        goto done;
    }
    f->direct = 1;
    st = MLU_OK;
done:
    return st;
}

mlu_status mlu_afile_open(mlu_afile *f, const char *target, unsigned flags, mlu_error *err)
{
    mlu_status st = MLU_ENOMEM;
    const char *base = strrchr(target, '/');
    char *dir = NULL, *resolved = NULL;
    size_t n;
    int tries;
    struct stat sb;
    mode_t mode;

    f->fd = -1;
    f->target = NULL;
    f->tmp = NULL;
    f->direct = 0;
    f->flags = flags;
    f->written = 0;
    f->flushed = 0;
    if ((flags & ~MLU_AFILE_ALL_FLAGS) != 0) {
        st = mlu_error_set(err, MLU_EINVAL, -1, "unknown atomic file flags 0x%x",
                           flags & ~MLU_AFILE_ALL_FLAGS);
        goto error;
    }
    base = base ? base + 1 : target;
    if (*base == '\0') {
        st = mlu_error_set(err, MLU_EINVAL, -1, "path '%s' names a folder, not a file", target);
        goto error;
    }
    /* A symbolic link is written through, as open() would: the new file
     * replaces the one it points to (renaming over the link itself would
     * leave that file stale).  A dangling link is replaced. */
    if (lstat(target, &sb) == 0 && S_ISLNK(sb.st_mode)) {
        resolved = mlu_malloc(PATH_MAX);
        if (resolved == NULL) {
            st = mlu_error_set(err, MLU_ENOMEM, -1, "out of memory");
            goto error;
        }
        if (realpath(target, resolved) != NULL) {
            target = resolved;
            base = strrchr(target, '/') + 1; /* realpath gives an absolute path */
        }
    }
    /* Only a regular file is replaced: a FIFO or device is written in
     * place (renaming over /dev/null would replace /dev/null). */
    if (stat(target, &sb) == 0 && !S_ISREG(sb.st_mode)) {
        if (S_ISDIR(sb.st_mode)) {
            st = mlu_error_errno(err, EISDIR, "cannot write '%s'", target);
            goto error;
        }
        st = open_direct(f, target, err);
        if (st != MLU_OK)
            goto error;
        goto done;
    }
    dir = dir_of(target);
    f->target = dup_str(target);
    if (dir == NULL || f->target == NULL) {
        st = mlu_error_set(err, MLU_ENOMEM, -1, "out of memory");
        goto error;
    }
    n = strlen(dir) + strlen(base) + 32;
    f->tmp = mlu_malloc(n);
    if (f->tmp == NULL) {
        st = mlu_error_set(err, MLU_ENOMEM, -1, "out of memory");
        goto error;
    }
    reap_stale(dir, base);
    for (tries = 0;; tries++) {
        /* The temp name adds 12 bytes to the target's: a name near the
         * filesystem's limit (255) keeps only its first TMP_BASE bytes there. */
        snprintf(f->tmp, n, "%s/.%.*s.XXXXXX.tmp", dir, TMP_BASE, base);
        f->fd = mkostemps(f->tmp, 4, O_CLOEXEC);
        if (f->fd < 0) {
            st = mlu_error_errno(err, errno, "cannot create a temporary file beside '%s'", target);
            mlu_free(f->tmp);
            f->tmp = NULL;
            goto error;
        }
        if (lock_own_temp(f->fd, f->tmp))
            break;
        /* a reaper took the name before the lock: it is not ours to unlink */
        close(f->fd);
        f->fd = -1;
        if (tries + 1 == TMP_TRIES) {
            st = mlu_error_errno(err, EAGAIN, "temporary files beside '%s' keep disappearing", target);
            mlu_free(f->tmp);
            f->tmp = NULL;
            goto error;
        }
    }
    /* Replacing a file keeps its permissions (a private 0600 file must not
     * come back 0644); a new one gets what open() would give it. */
    if (stat(target, &sb) == 0 && S_ISREG(sb.st_mode))
        mode = sb.st_mode & 0777;
    else
        mode = 0666 & ~current_umask();
    if (fchmod(f->fd, mode) != 0) {
        st = mlu_error_errno(err, errno, "cannot set the mode of '%s'", f->tmp);
        goto error;
    }
    st = MLU_OK;
    goto done;
error:
    mlu_afile_abort(f);
done:
    mlu_free(dir);
    mlu_free(resolved);
    return st;
}

mlu_status mlu_afile_write(mlu_afile *f, const void *p, size_t n, mlu_error *err)
{
    mlu_status st = MLU_OK;
    const char *c = p;
    int pace = (f->flags & MLU_AFILE_DURABLE) && !f->direct;

    while (n > 0) {
        size_t chunk = n > ((size_t)1 << 30) ? ((size_t)1 << 30) : n;
        ssize_t w;
        /* durable: stop at the next step boundary, so each step is whole */
        if (pace && f->flushed + MLU_AFILE_WRITEBACK_STEP - f->written < chunk)
            chunk = (size_t)(f->flushed + MLU_AFILE_WRITEBACK_STEP - f->written);
        w = write(f->fd, c, chunk);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            st = mlu_error_errno(err, errno, "cannot write '%s'", f->target);
            goto done;
        }
        if (w == 0) { /* nothing written and no error: a retry would spin for ever */
            st = mlu_error_errno(err, ENOSPC, "cannot write '%s': the file system took no bytes", f->target);
            goto done;
        }
        c += w;
        n -= (size_t)w;
        f->written += (uint64_t)w;
        if (pace && f->written - f->flushed >= MLU_AFILE_WRITEBACK_STEP) {
#ifdef SYNC_FILE_RANGE_WRITE
            /* advisory: a filesystem that refuses it only leaves the fsync all the work */
            (void)sync_file_range(f->fd, (off64_t)f->flushed, (off64_t)(f->written - f->flushed),
                                  SYNC_FILE_RANGE_WRITE);
#endif
            f->flushed = f->written;
        }
    }
done:
    return st;
}

/* A FIFO or device written in place: flushed where that means something
 * (a block device), then closed. */
static mlu_status commit_direct(mlu_afile *f, mlu_error *err)
{
    mlu_status st = MLU_EIO;
    int fd = f->fd;

    f->fd = -1;
    if (fsync(fd) != 0 && errno != EINVAL && errno != EROFS && errno != ENOTSUP) {
        st = mlu_error_errno(err, errno, "cannot flush '%s'", f->target);
        close(fd);
        goto done;
    }
    if (close(fd) != 0) {
        st = mlu_error_errno(err, errno, "cannot close '%s'", f->target);
        goto done;
    }
    st = MLU_OK;
done:
    return st;
}

mlu_status mlu_afile_commit(mlu_afile *f, mlu_error *err)
{
    mlu_status st = MLU_EIO;
    char *dir = NULL;
    int dfd = -1;

    if (f->fd >= 0 && f->direct) {
        st = commit_direct(f, err);
        goto done;
    }
    if (f->fd < 0 || f->tmp == NULL) {
        st = mlu_error_set(err, MLU_EINVAL, -1, "atomic file is not open");
        goto done;
    }
    if ((f->flags & MLU_AFILE_DURABLE) && fsync(f->fd) != 0) {
        st = mlu_error_errno(err, errno, "cannot flush '%s' to disk", f->target);
        goto done;
    }
    /* Renamed while still open (and locked): a reaper never sees the temp
     * name unlocked before it is gone. */
    if (rename(f->tmp, f->target) != 0) {
        st = mlu_error_errno(err, errno, "cannot move the new file over '%s'", f->target);
        goto done;
    }
    mlu_free(f->tmp);
    f->tmp = NULL;
    if (close(f->fd) != 0) {
        f->fd = -1;
        st = mlu_error_errno(err, errno, "cannot close '%s'", f->target);
        goto done;
    }
    f->fd = -1;
    if (!(f->flags & MLU_AFILE_DURABLE)) {
        st = MLU_OK; /* atomic, not durable: no fsync of the folder either */
        goto done;
    }
    /* Make the rename itself durable.  Some filesystems refuse to fsync a
     * folder (EINVAL): the data is already safe then, so only real I/O
     * errors count. */
    dir = dir_of(f->target);
    if (dir == NULL) {
        st = mlu_error_set(err, MLU_ENOMEM, -1, "out of memory");
        goto done;
    }
    dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0 && fsync(dfd) != 0 && errno == EIO) {
        st = mlu_error_errno(err, errno, "cannot flush the folder of '%s'", f->target);
        goto done;
    }
    st = MLU_OK;
done:
    /* always: close the folder, and release the handle (unlinks the
     * temporary file when the rename did not happen) */
    if (dfd >= 0)
        close(dfd);
    mlu_free(dir);
    mlu_afile_abort(f);
    return st;
}

void mlu_afile_abort(mlu_afile *f)
{
    /* the temp file is unlinked before its descriptor (and lock) goes, so
     * no reaper can find it unlocked meanwhile */
    if (f->tmp != NULL) {
        unlink(f->tmp);
        mlu_free(f->tmp);
        f->tmp = NULL;
    }
    if (f->fd >= 0) {
        close(f->fd);
        f->fd = -1;
    }
    f->direct = 0;
    mlu_free(f->target);
    f->target = NULL;
}

mlu_status mlu_write_file_atomic(const char *path, const void *p, size_t n, unsigned flags,
                                 mlu_error *err)
{
    mlu_afile f;
    mlu_status st = mlu_afile_open(&f, path, flags, err);

    if (st != MLU_OK)
        goto done; /* open released everything it took */
    st = mlu_afile_write(&f, p, n, err);
    if (st == MLU_OK)
        st = mlu_afile_commit(&f, err); /* releases f either way */
    else
        mlu_afile_abort(&f);
done:
    return st;
}

mlu_status mlu_read_file(const char *path, char **data, size_t *len, mlu_error *err)
{
    mlu_status st = MLU_EIO;
    int fd = -1;
    struct stat sb;
    char *p = NULL;
    size_t size, got = 0;

    *data = NULL;
    *len = 0;
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        st = mlu_error_errno(err, errno, "cannot open '%s'", path);
        goto error;
    }
    if (fstat(fd, &sb) != 0) {
        st = mlu_error_errno(err, errno, "cannot stat '%s'", path);
        goto error;
    }
    if (S_ISDIR(sb.st_mode)) {
        st = mlu_error_errno(err, EISDIR, "'%s' is a folder", path);
        goto error;
    }
    if (sb.st_size < 0 || (uint64_t)sb.st_size >= (uint64_t)SIZE_MAX) {
        st = mlu_error_set(err, MLU_EOVERFLOW, -1, "'%s' is too large to read", path);
        goto error;
    }
    size = (size_t)sb.st_size;
    p = mlu_malloc(size + 1);
    if (p == NULL) {
        st = mlu_error_set(err, MLU_ENOMEM, -1, "out of memory reading '%s'", path);
        goto error;
    }
    /* A regular file is read up to the size fstat gave (one read call for
     * small files); anything else (a pipe, /proc, a file fstat says is
     * empty) to EOF, growing the buffer.  With the buffer full, one byte is
     * read first (EOF costs no realloc), into `probe`. */
    for (;;) {
        char probe, *dst = p + got;
        size_t want = size - got, grown = 0;
        ssize_t r;
        if (got == size && got > 0 && S_ISREG(sb.st_mode) && got == (size_t)sb.st_size)
            break;
        if (got == size) {
            if (mlu_mul_overflow_size(size ? size : 4096, 2, &grown) || grown == SIZE_MAX) {
                st = mlu_error_set(err, MLU_EOVERFLOW, -1, "'%s' is too large to read", path);
                goto error;
            }
            dst = &probe;
            want = 1;
        }
        r = read(fd, dst, want);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            st = mlu_error_errno(err, errno, "cannot read '%s'", path);
            goto error;
        }
        if (r == 0)
            break;
        if (dst == &probe) {
            char *q = mlu_realloc(p, grown + 1);
            if (q == NULL) {
                st = mlu_error_set(err, MLU_ENOMEM, -1, "out of memory reading '%s'", path);
                goto error;
            }
            p = q;
            p[got++] = probe;
            size = grown;
        } else {
            got += (size_t)r;
        }
    }
    p[got] = '\0';
    *data = p;
    *len = got;
    p = NULL;
    st = MLU_OK;
error:
    if (fd >= 0)
        close(fd);
    mlu_free(p);
    return st;
}
