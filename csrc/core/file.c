/* file.c: open and check, read at an offset, map privately (see file.h). */
#define _GNU_SOURCE
#include "file.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* What a file that is not regular (nor a directory) is, for messages. */
static const char *kind_of(mode_t mode)
{
    if (S_ISFIFO(mode))
        return "a FIFO";
    if (S_ISCHR(mode))
        return "a character device";
    if (S_ISBLK(mode))
        return "a block device";
    if (S_ISSOCK(mode))
        return "a socket";
    return "a special file";
}

/* The status and message of a path that is not a regular file. */
static mlu_status not_regular(const char *path, mode_t mode, mlu_error *err)
{
    if (S_ISDIR(mode))
        return mlu_error_errno(err, EISDIR, "'%s' is a directory", path);
    return mlu_error_set(err, MLU_EINVAL, -1, "'%s' is %s, not a regular file", path, kind_of(mode));
}

mlu_status mlu_file_open_ro(const char *path, int *fd, uint64_t *size, mlu_error *err)
{
    mlu_status st = MLU_OK;
    struct stat sb;
    int f, flags;

    *fd = -1;
    *size = 0;
    /* What is not a regular file is refused before it is opened: opening a
     * device can have effects of its own. */
    if (stat(path, &sb) == 0 && !S_ISREG(sb.st_mode)) {
        st = not_regular(path, sb.st_mode, err);
        goto done;
    }
    /* O_NONBLOCK: should the path become a FIFO after the stat, it opens
     * without waiting for a writer (and is then refused); cleared again for a
     * regular file.  A regular file someone holds a lease on answers
     * EWOULDBLOCK instead of waiting for the lease's break: then it is
     * opened as open() would, waiting. */
    f = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    if (f < 0 && (errno == EWOULDBLOCK || errno == EAGAIN))
        f = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
    if (f < 0) {
        int e = errno;
        /* a socket cannot be opened (ENXIO): name it as the other kinds */
        if (e == ENXIO && stat(path, &sb) == 0 && S_ISSOCK(sb.st_mode))
            st = not_regular(path, sb.st_mode, err);
        else
            st = mlu_error_errno(err, e, "cannot open '%s'", path);
        goto done;
    }
    if (fstat(f, &sb) != 0) {
        st = mlu_error_errno(err, errno, "cannot stat '%s'", path);
        goto error;
    }
    if (!S_ISREG(sb.st_mode)) {
        st = not_regular(path, sb.st_mode, err);
        goto error;
    }
    if (sb.st_size < 0) {
        st = mlu_error_set(err, MLU_EINVAL, -1, "'%s' has a negative size", path);
        goto error;
    }
    flags = fcntl(f, F_GETFL);
    if (flags < 0 || fcntl(f, F_SETFL, flags & ~O_NONBLOCK) < 0) {
        st = mlu_error_errno(err, errno, "cannot set up '%s' for reading", path);
        goto error;
    }
    *fd = f;
    *size = (uint64_t)sb.st_size;
    goto done;
error:
    close(f);
done:
    return st;
}

mlu_status mlu_file_read_at(int fd, uint64_t off, void *dst, size_t n, const char *what, mlu_error *err)
{
    mlu_status st = MLU_OK;
    size_t done = 0;

    while (done < n) {
        size_t chunk = n - done > ((size_t)1 << 30) ? ((size_t)1 << 30) : n - done;
        ssize_t got = pread(fd, (uint8_t *)dst + done, chunk, (off_t)(off + done));
        if (got < 0 && errno == EINTR)
            continue;
        if (got < 0) {
            st = mlu_error_errno(err, errno, "cannot read %s at byte %llu", what, (unsigned long long)(off + done));
            goto done;
        }
        if (got == 0) {
            st = mlu_error_set(err, MLU_EFORMAT, (int64_t)(off + done),
                               "file shrank while reading %s: no byte %llu (truncated by another process?)", what,
                               (unsigned long long)(off + done));
            goto done;
        }
        done += (size_t)got;
    }
done:
    return st;
}

mlu_status mlu_file_check_size(int fd, uint64_t size, mlu_error *err)
{
    mlu_status st = MLU_OK;
    struct stat sb;

    if (fstat(fd, &sb) != 0) {
        st = mlu_error_errno(err, errno, "cannot stat the file");
        goto done;
    }
    if (sb.st_size < 0 || (uint64_t)sb.st_size < size) {
        st = mlu_error_set(err, MLU_EFORMAT, -1,
                           "file shrank from %llu to %llu bytes since it was opened (truncated by another process?)",
                           (unsigned long long)size, (unsigned long long)(sb.st_size < 0 ? 0 : sb.st_size));
        goto done;
    }
done:
    return st;
}

mlu_status mlu_file_map_fd(mlu_file_map *m, int fd, uint64_t size, mlu_error *err)
{
    mlu_status st = MLU_OK;
    void *p;

    m->data = NULL;
    m->size = 0;
    if (size > (uint64_t)SIZE_MAX) {
        st = mlu_error_set(err, MLU_EOVERFLOW, -1, "cannot map a file of %llu bytes on this machine",
                           (unsigned long long)size);
        goto done;
    }
    if (size == 0)
        goto done;
    p = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
        st = mlu_error_errno(err, errno, "cannot map the file");
        goto done;
    }
    m->data = p;
    m->size = (size_t)size;
done:
    return st;
}

mlu_status mlu_file_map_anon(mlu_file_map *m, size_t size, mlu_error *err)
{
    mlu_status st = MLU_OK;
    void *p;

    m->data = NULL;
    m->size = 0;
    if (size == 0)
        goto done;
    p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        st = mlu_error_set(err, MLU_ENOMEM, -1, "cannot map %zu bytes of memory", size);
        goto done;
    }
    m->data = p;
    m->size = size;
done:
    return st;
}

void mlu_file_map_close(mlu_file_map *m)
{
    if (m->data != NULL)
        munmap(m->data, m->size);
    m->data = NULL;
    m->size = 0;
}
