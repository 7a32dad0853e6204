#define _GNU_SOURCE
/* Unit tests of core/file (open and check, read at, size check, mappings)
 * and of the durable writer's writeback pacing (core/atomicfile). */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "mlu_test.h"
#include "core/alloc.h"
#include "core/atomicfile.h"
#include "core/file.h"

static char dir[64];

static void path_in(char *out, size_t cap, const char *name)
{
    snprintf(out, cap, "%s/%s", dir, name);
}

static void write_bytes(const char *path, const void *p, size_t n)
{
    FILE *f = fopen(path, "wb");
    CHECK(f != NULL);
    if (f != NULL) {
        CHECK(fwrite(p, 1, n, f) == n);
        fclose(f);
    }
}

/* Opening what is not a regular file: the status, errno and message. */
static void test_open_kinds(void)
{
    char p[128], want[200];
    mlu_error err;
    uint64_t size = 7;
    int fd = 3, s;
    struct sockaddr_un addr;

    /* a directory: MLU_EIO with EISDIR, naming the path */
    mlu_error_clear(&err);
    CHECK(mlu_file_open_ro(dir, &fd, &size, &err) == MLU_EIO);
    CHECK(err.sys_errno == EISDIR && fd == -1 && size == 0);
    snprintf(want, sizeof(want), "'%s' is a directory", dir);
    CHECK_STR(err.text, want);

    /* a FIFO without a writer: refused at once, never waited on */
    path_in(p, sizeof(p), "fifo");
    CHECK(mkfifo(p, 0600) == 0);
    mlu_error_clear(&err);
    CHECK(mlu_file_open_ro(p, &fd, &size, &err) == MLU_EINVAL && fd == -1);
    snprintf(want, sizeof(want), "'%s' is a FIFO, not a regular file", p);
    CHECK_STR(err.text, want);
    unlink(p);

    /* a character device */
    mlu_error_clear(&err);
    CHECK(mlu_file_open_ro("/dev/null", &fd, &size, &err) == MLU_EINVAL && fd == -1);
    CHECK_STR(err.text, "'/dev/null' is a character device, not a regular file");

    /* a socket (open() says ENXIO: it is named as the other kinds) */
    path_in(p, sizeof(p), "sock");
    s = socket(AF_UNIX, SOCK_STREAM, 0);
    CHECK(s >= 0);
    memset(&addr, 0, sizeof(addr));
    addr.sun_family = AF_UNIX;
    CHECK(strlen(p) < sizeof(addr.sun_path));
    memcpy(addr.sun_path, p, strlen(p) + 1 < sizeof(addr.sun_path) ? strlen(p) + 1 : sizeof(addr.sun_path) - 1);
    CHECK(bind(s, (struct sockaddr *)&addr, sizeof(addr)) == 0);
    mlu_error_clear(&err);
    CHECK(mlu_file_open_ro(p, &fd, &size, &err) == MLU_EINVAL && fd == -1);
    snprintf(want, sizeof(want), "'%s' is a socket, not a regular file", p);
    CHECK_STR(err.text, want);
    close(s);
    unlink(p);

    /* missing: errno kept */
    path_in(p, sizeof(p), "missing");
    mlu_error_clear(&err);
    CHECK(mlu_file_open_ro(p, &fd, &size, &err) == MLU_EIO && err.sys_errno == ENOENT && fd == -1);
}

/* Empty and regular files; reads at offsets; the size check; mappings. */
static void test_regular(void)
{
    char p[128];
    mlu_error err;
    uint64_t size = 9;
    int fd = -1, flags;
    uint8_t buf[16];
    mlu_file_map m = {NULL, 0};

    path_in(p, sizeof(p), "empty");
    write_bytes(p, "", 0);
    mlu_error_clear(&err);
    CHECK(mlu_file_open_ro(p, &fd, &size, &err) == MLU_OK && fd >= 0 && size == 0);
    CHECK(mlu_file_map_fd(&m, fd, size, &err) == MLU_OK && m.data == NULL && m.size == 0);
    mlu_file_map_close(&m);
    close(fd);
    unlink(p);

    path_in(p, sizeof(p), "regular");
    write_bytes(p, "0123456789", 10);
    mlu_error_clear(&err);
    CHECK(mlu_file_open_ro(p, &fd, &size, &err) == MLU_OK && fd >= 0 && size == 10);
    flags = fcntl(fd, F_GETFL);
    CHECK(flags >= 0 && !(flags & O_NONBLOCK) && (fcntl(fd, F_GETFD) & FD_CLOEXEC));
    CHECK(mlu_file_read_at(fd, 3, buf, 4, "x", &err) == MLU_OK && memcmp(buf, "3456", 4) == 0);
    CHECK(mlu_file_read_at(fd, 0, buf, 0, "x", &err) == MLU_OK);
    CHECK(mlu_file_check_size(fd, 10, &err) == MLU_OK);
    CHECK(mlu_file_map_fd(&m, fd, size, &err) == MLU_OK && m.data != NULL && m.size == 10);
    CHECK(memcmp(m.data, "0123456789", 10) == 0);
    m.data[0] = 'X'; /* private: the file does not change */
    CHECK(mlu_file_read_at(fd, 0, buf, 1, "x", &err) == MLU_OK && buf[0] == '0');
    mlu_file_map_close(&m);
    CHECK(m.data == NULL && m.size == 0);
    mlu_file_map_close(&m); /* twice is fine */

    /* cut by another writer: a short read and the size check say so */
    CHECK(truncate(p, 6) == 0);
    mlu_error_clear(&err);
    CHECK(mlu_file_read_at(fd, 4, buf, 4, "the header", &err) == MLU_EFORMAT && err.offset == 6);
    CHECK_STR(err.text, "file shrank while reading the header: no byte 6 (truncated by another process?)");
    mlu_error_clear(&err);
    CHECK(mlu_file_check_size(fd, 10, &err) == MLU_EFORMAT);
    CHECK_STR(err.text, "file shrank from 10 to 6 bytes since it was opened (truncated by another process?)");
    mlu_error_clear(&err);
    CHECK(mlu_file_check_size(fd, 6, &err) == MLU_OK);
    close(fd);
    mlu_error_clear(&err);
    CHECK(mlu_file_check_size(-1, 6, &err) == MLU_EIO && err.sys_errno == EBADF);
    unlink(p);

    mlu_error_clear(&err);
    CHECK(mlu_file_map_anon(&m, 5000, &err) == MLU_OK && m.data != NULL && m.size == 5000);
    CHECK(m.data[4999] == 0);
    mlu_file_map_close(&m);
    CHECK(mlu_file_map_anon(&m, 0, &err) == MLU_OK && m.data == NULL);
}

/* Durable writes start writeback at every MLU_AFILE_WRITEBACK_STEP
 * boundary (flushed follows it), whatever the sizes of the writes; plain
 * ones never; the bytes are the same. */
static void test_writeback_pacing(void)
{
    const size_t step = (size_t)MLU_AFILE_WRITEBACK_STEP;
    const size_t total = 2 * step + 12345;
    size_t piece, off, n;
    char p[128];
    uint8_t *data = mlu_malloc(total), *back = NULL;
    mlu_afile f;
    mlu_error err;
    unsigned flags;
    size_t len = 0;

    CHECK(data != NULL);
    if (data == NULL)
        return;
    for (off = 0; off < total; off++)
        data[off] = (uint8_t)(off * 131 + (off >> 13));
    path_in(p, sizeof(p), "paced.bin");
    for (flags = 0; flags <= MLU_AFILE_DURABLE; flags += MLU_AFILE_DURABLE) {
        /* one write of everything, writes of 3 MiB + 1 (never on a boundary), and 1 byte then the rest */
        for (piece = 0; piece < 3; piece++) {
            mlu_error_clear(&err);
            CHECK(mlu_afile_open(&f, p, flags, &err) == MLU_OK);
            CHECK(f.written == 0 && f.flushed == 0);
            for (off = 0; off < total; off += n) {
                n = piece == 0 ? total : piece == 1 ? (size_t)(3 << 20) + 1 : (off == 0 ? 1 : total - 1);
                if (n > total - off)
                    n = total - off;
                CHECK(mlu_afile_write(&f, data + off, n, &err) == MLU_OK);
                /* flushed: the last whole step written (durable), never past written */
                CHECK(f.written == off + n);
                CHECK(f.flushed == (flags ? (off + n) / step * step : 0));
            }
            CHECK(mlu_afile_commit(&f, &err) == MLU_OK);
            CHECK(mlu_read_file(p, (char **)&back, &len, &err) == MLU_OK);
            CHECK(len == total && back != NULL && memcmp(back, data, total) == 0);
            mlu_free(back);
            back = NULL;
        }
    }
    unlink(p);
    mlu_free(data);
}

int main(void)
{
    snprintf(dir, sizeof(dir), "/tmp/mlu_test_file.XXXXXX");
    if (mkdtemp(dir) == NULL) {
        perror("mkdtemp");
        return 1;
    }
    test_open_kinds();
    test_regular();
    test_writeback_pacing();
    rmdir(dir);
    return TEST_DONE("test_file");
}
