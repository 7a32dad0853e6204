/* test_read_bounds.c: every reader reads its input to exactly its last byte
 * and never one byte further.
 *
 * Each valid image (a .pt zip written by the core writer, a legacy .pt whose
 * storage ends at the last byte, a safetensors file) sits in a heap buffer
 * of exactly its size, so that AddressSanitizer (make ctest-asan) reports a
 * read of one byte past it: the whole image reads (to the last byte of its
 * last storage), and every shorter one fails cleanly.  The same images as
 * files: exact, then cut by one byte.  And the one "read n bytes at offset"
 * primitive of each source (mlu_rd_read, mlu_file_read_at) at offset + n ==
 * size (read) and size + 1 (refused). */
#define _DEFAULT_SOURCE
#include "mlu_test.h"

#include <stdlib.h>
#include <unistd.h>

#include "core/alloc.h"
#include "core/buf.h"
#include "core/file.h"
#include "core/ptload_file.h"
#include "core/ptwrite.h"
#include "core/safetensors.h"
#include "core/zipread.h"

static const float VALUES[4] = {1.0f, 2.0f, -3.0f, 0.5f};

/* A heap copy of exactly n bytes (n == 0: one byte, never read). */
static uint8_t *exact_copy(const void *p, size_t n)
{
    uint8_t *b = malloc(n > 0 ? n : 1);
    if (b != NULL && n > 0)
        memcpy(b, p, n);
    return b;
}

/* A file holding the n bytes at p; its path in path (a mkstemp template). */
static int write_file(char *path, const void *p, size_t n)
{
    int fd = mkstemp(path), ok;
    if (fd < 0)
        return -1;
    ok = write(fd, p, n) == (ssize_t)n;
    close(fd);
    return ok ? 0 : -1;
}

/* ------------------------------------------------------------------ images */

static mlu_status to_buf(void *ctx, const void *p, size_t n, mlu_error *err)
{
    return mlu_buf_append((mlu_buf *)ctx, p, n, err);
}

/* {'w': tensor(VALUES)} as torch.save lays it out, from the core writer. */
static mlu_status zip_image(mlu_buf *out, mlu_error *err)
{
    const int64_t shape[1] = {4}, stride[1] = {1};
    uint32_t pid[MLU_PTW_PID_COUNT] = {MLU_PTW_NO_MEMO, MLU_PTW_NO_MEMO, MLU_PTW_NO_MEMO}, m = 0;
    mlu_ptw w;
    mlu_ptw_seq sd;
    mlu_ptw_tensor t;
    size_t idx = 0;
    mlu_status s;

    memset(&t, 0, sizeof(t));
    t.dtype = mlu_torch_dtype_named("float32");
    t.ndim = 1;
    t.shape = shape;
    t.stride = stride;
    s = mlu_ptw_init(&w, err);
    if (s == MLU_OK)
        s = mlu_ptw_dict_begin(&w, &sd, 1, &m, err);
    if (s == MLU_OK)
        s = mlu_ptw_item(&w, &sd, err);
    if (s == MLU_OK)
        s = mlu_ptw_str(&w, "w", 1, &m, err);
    if (s == MLU_OK)
        s = mlu_ptw_storage_add(&w, t.dtype, sizeof(VALUES), VALUES, &idx, err);
    t.storage = idx;
    if (s == MLU_OK)
        s = mlu_ptw_tensor_begin(&w, &t, pid, err);
    if (s == MLU_OK)
        s = mlu_ptw_tensor_end(&w, &m, err);
    if (s == MLU_OK)
        s = mlu_ptw_seq_end(&w, &sd, NULL, err);
    if (s == MLU_OK)
        s = mlu_ptw_pickle_end(&w, err);
    if (s == MLU_OK)
        s = mlu_ptw_archive_write(&w, "archive", to_buf, out, MLU_ZIP64_LIMIT, NULL, NULL, err);
    mlu_ptw_free(&w);
    return s;
}

#define S(lit) lit, sizeof(lit) - 1

/* A legacy (pre-zip) .pt file: five pickles, then each storage's count and
 * bytes; the one storage is the file's last 16 bytes. */
static void legacy_image(mlu_buf *out)
{
    static const char head[] =
        /* magic number: LONG1 of 10 bytes */
        "\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19."
        /* protocol version 1001 */
        "\x80\x02M\xe9\x03."
        /* sys_info: a dict (never read) */
        "\x80\x02}."
        /* {'w': _rebuild_tensor_v2(('storage', FloatStorage, '0', 'cpu', 4, None), 0, (4,), (1,), False,
         *  OrderedDict())} */
        "\x80\x02}X\x01\x00\x00\x00w" "ctorch._utils\n_rebuild_tensor_v2\n"
        "((X\x07\x00\x00\x00storage" "ctorch\nFloatStorage\n" "X\x01\x00\x00\x00" "0" "X\x03\x00\x00\x00" "cpu"
        "K\x04NtQ" "K\x00K\x04\x85K\x01\x85\x89" "ccollections\nOrderedDict\n)RtRs."
        /* the storage keys */
        "\x80\x02](X\x01\x00\x00\x00" "0e."
        /* storage '0': its element count (int64 little-endian), then its bytes */
        "\x04\x00\x00\x00\x00\x00\x00\x00";
    mlu_error err;

    mlu_error_clear(&err);
    out->len = 0;
    CHECK(mlu_buf_append(out, head, sizeof(head) - 1, &err) == MLU_OK);
    CHECK(mlu_buf_append(out, VALUES, sizeof(VALUES), &err) == MLU_OK);
}

/* {'a': I64 [1] = {7}, 'b': F32 [4] = VALUES}: b's bytes are the file's last
 * (the writer orders tensors by dtype, descending: I64 before F32). */
static void st_image(mlu_buf *out)
{
    static const int64_t a[1] = {7};
    const uint64_t sa[1] = {1}, sb[1] = {4};
    mlu_st_entry e[2] = {
        {"b", 1, MLU_ST_F32, 1, sb, VALUES, sizeof(VALUES), 0},
        {"a", 1, MLU_ST_I64, 1, sa, a, sizeof(a), 0},
    };
    uint64_t dlen = 0;
    size_t i;
    mlu_error err;

    mlu_error_clear(&err);
    out->len = 0;
    CHECK(mlu_st_build_header(e, 2, NULL, 0, 0, out, &dlen, &err) == MLU_OK);
    CHECK(dlen == sizeof(a) + sizeof(VALUES));
    CHECK(e[0].dtype == MLU_ST_I64 && e[1].dtype == MLU_ST_F32);  /* sorted into file order */
    for (i = 0; i < 2; i++)
        CHECK(mlu_buf_append(out, e[i].data, (size_t)e[i].nbytes, &err) == MLU_OK);
}

/* ------------------------------------------------------------------ primitives */

/* mlu_rd_read over rd (n bytes of `want`): every read ending at the last
 * byte works, every one ending a byte later is refused, never performed. */
static void check_rd_bounds(const mlu_rd *rd, const uint8_t *want, size_t n)
{
    uint8_t got[64];
    size_t k;
    mlu_error err;

    CHECK(n <= sizeof(got));
    for (k = 0; k <= n && k <= sizeof(got) - 1; k++) {
        uint64_t off = n - k;
        mlu_error_clear(&err);
        memset(got, 0xAB, sizeof(got));
        CHECK(mlu_rd_read(rd, off, got, k, "the tail", &err) == MLU_OK);  /* [off, n): to the last byte */
        CHECK(memcmp(got, want + off, k) == 0);
        mlu_error_clear(&err);
        CHECK(mlu_rd_read(rd, off, got, k + 1, "the tail", &err) == MLU_EFORMAT);  /* one byte further */
        CHECK(strstr(err.text, "the tail at byte") == err.text && strstr(err.text, "runs past the end") != NULL);
        CHECK(err.offset == (int64_t)off);
        CHECK(got[k] == 0xAB);  /* nothing written for a refused read */
    }
    mlu_error_clear(&err);
    CHECK(mlu_rd_read(rd, n, got, 0, "nothing", &err) == MLU_OK);          /* empty, at the end */
    CHECK(mlu_rd_read(rd, n + 1, got, 0, "nothing", &err) == MLU_EFORMAT);  /* empty, past it */
    mlu_error_clear(&err);
    CHECK(mlu_rd_read(rd, UINT64_MAX, got, 2, "wrapping", &err) == MLU_EFORMAT);  /* off + n wraps */
}

static void test_rd_read_bounds(void)
{
    static const char text[] = "0123456789abcdefghijklmnopqrstu";  /* 31 bytes */
    size_t n = sizeof(text) - 1;
    uint8_t *buf = exact_copy(text, n);
    char path[] = "/tmp/mlu_bounds_XXXXXX";
    uint64_t size = 0;
    int fd = -1;
    mlu_rd rd;
    mlu_error err;
    uint8_t got[40];

    CHECK(buf != NULL);
    if (buf == NULL)
        return;
    mlu_rd_mem(&rd, buf, n);
    check_rd_bounds(&rd, buf, n);
    free(buf);

    CHECK(write_file(path, text, n) == 0);
    mlu_error_clear(&err);
    CHECK(mlu_file_open_ro(path, &fd, &size, &err) == MLU_OK && size == n);
    if (fd < 0)
        return;
    mlu_rd_fd(&rd, fd, size);
    check_rd_bounds(&rd, (const uint8_t *)text, n);
    /* the file primitive itself: to EOF works, one byte past it is a short read */
    mlu_error_clear(&err);
    CHECK(mlu_file_read_at(fd, 0, got, n, "all", &err) == MLU_OK && memcmp(got, text, n) == 0);
    CHECK(mlu_file_read_at(fd, n - 1, got, 1, "the last byte", &err) == MLU_OK && got[0] == 'u');
    CHECK(mlu_file_read_at(fd, n, got, 0, "nothing", &err) == MLU_OK);
    CHECK(mlu_file_read_at(fd, 0, got, n + 1, "all and one", &err) == MLU_EFORMAT);
    CHECK(err.offset == (int64_t)n && strstr(err.text, "no byte 31") != NULL);
    mlu_error_clear(&err);
    CHECK(mlu_file_read_at(fd, n, got, 1, "one past", &err) == MLU_EFORMAT && err.offset == (int64_t)n);
    close(fd);
    unlink(path);
}

/* ------------------------------------------------------------------ .pt */

/* Opens the .pt image rd and reads storage 0 (to the last byte of the legacy
 * image); MLU_OK when everything read back as written. */
static mlu_status pt_read_all(const mlu_rd *rd, int verify, mlu_error *err)
{
    mlu_pt pt;
    float out[4];
    mlu_status st;

    mlu_error_clear(err);
    st = mlu_pt_open(&pt, rd, verify, err);
    if (st != MLU_OK)
        goto done;
    if (pt.vm.n_storages != 1 || pt.vm.storages[0].nbytes != sizeof(out)) {
        st = mlu_error_set(err, MLU_EFORMAT, -1, "test: unexpected storages");
    } else if ((st = mlu_pt_storage_fill(&pt, 0, (uint8_t *)out, err)) == MLU_OK &&
               memcmp(out, VALUES, sizeof(out)) != 0) {
        st = mlu_error_set(err, MLU_EFORMAT, -1, "test: the storage read back wrong");
    }
    mlu_pt_close(&pt);
done:
    return st;
}

/* The image in heap buffers of exactly every length up to its own: only the
 * whole one reads, to its last byte; the others fail with a message. */
static void check_pt_exact_buffers(const uint8_t *image, size_t n, const char *what)
{
    size_t cut;
    int verify;

    for (cut = 0; cut <= n; cut++) {
        uint8_t *buf = exact_copy(image, cut);
        mlu_error err;
        mlu_rd rd;
        CHECK(buf != NULL);
        if (buf == NULL)
            return;
        for (verify = 0; verify < 2; verify++) {
            mlu_status st;
            mlu_rd_mem(&rd, buf, cut);
            st = pt_read_all(&rd, verify, &err);
            CHECK((st == MLU_OK) == (cut == n));
            CHECK(st == MLU_OK || (st == MLU_EFORMAT && err.text[0] != '\0'));
            if ((st == MLU_OK) != (cut == n))
                fprintf(stderr, "  %s cut at %zu of %zu: %s: %s\n", what, cut, n, mlu_status_name(st), err.text);
        }
        free(buf);
    }
}

/* The image as a file of exactly its size reads; cut by one byte (and opened
 * again: the size is the new one) it fails cleanly. */
static void check_pt_file(const uint8_t *image, size_t n, const char *why_short)
{
    char path[] = "/tmp/mlu_bounds_pt_XXXXXX";
    uint64_t size = 0;
    int fd = -1;
    mlu_rd rd;
    mlu_error err;

    CHECK(write_file(path, image, n) == 0);
    mlu_error_clear(&err);
    CHECK(mlu_file_open_ro(path, &fd, &size, &err) == MLU_OK && size == n);
    if (fd < 0)
        return;
    mlu_rd_fd(&rd, fd, size);
    CHECK(pt_read_all(&rd, 0, &err) == MLU_OK);
    CHECK(pt_read_all(&rd, 1, &err) == MLU_OK);
    close(fd);
    CHECK(truncate(path, (off_t)n - 1) == 0);
    mlu_error_clear(&err);
    CHECK(mlu_file_open_ro(path, &fd, &size, &err) == MLU_OK && size == n - 1);
    if (fd >= 0) {
        mlu_rd_fd(&rd, fd, size);
        CHECK(pt_read_all(&rd, 0, &err) == MLU_EFORMAT);
        CHECK(strstr(err.text, why_short) != NULL);
        if (strstr(err.text, why_short) == NULL)
            fprintf(stderr, "  cut by one: %s (wanted '%s')\n", err.text, why_short);
        close(fd);
    }
    unlink(path);
}

static void test_pt_zip(void)
{
    mlu_buf img = MLU_BUF_INIT;
    mlu_error err;

    mlu_error_clear(&err);
    CHECK(zip_image(&img, &err) == MLU_OK);
    if (err.code != MLU_OK) {
        fprintf(stderr, "  zip image: %s\n", err.text);
        mlu_buf_free(&img);
        return;
    }
    check_pt_exact_buffers((const uint8_t *)img.data, img.len, "zip");
    check_pt_file((const uint8_t *)img.data, img.len, "end-of-central-directory");
    mlu_buf_free(&img);
}

static void test_pt_legacy(void)
{
    mlu_buf img = MLU_BUF_INIT;

    legacy_image(&img);
    check_pt_exact_buffers((const uint8_t *)img.data, img.len, "legacy");
    check_pt_file((const uint8_t *)img.data, img.len, "legacy file is truncated in storage '0'");
    mlu_buf_free(&img);
}

/* ------------------------------------------------------------------ safetensors */

/* Parses the image and checks that its tensors' data ends at the last byte. */
static mlu_status st_parse_all(const uint8_t *data, uint64_t size, mlu_error *err)
{
    mlu_st_header h;
    mlu_status st;

    mlu_error_clear(err);
    st = mlu_st_parse(data, size, &h, err);
    if (st == MLU_OK) {
        if (h.ntensors != 2 || h.data_start + h.tensors[1].end != size)
            st = mlu_error_set(err, MLU_EFORMAT, -1, "test: unexpected layout");
        mlu_st_header_free(&h);
    }
    return st;
}

static void test_safetensors(void)
{
    mlu_buf img = MLU_BUF_INIT;
    char path[] = "/tmp/mlu_bounds_st_XXXXXX";
    uint64_t size = 0;
    size_t cut, n;
    int fd = -1;
    mlu_st_header h;
    mlu_error err;
    float last[4];

    st_image(&img);
    n = img.len;
    for (cut = 0; cut <= n; cut++) {
        uint8_t *buf = exact_copy(img.data, cut);
        mlu_status st;
        CHECK(buf != NULL);
        if (buf == NULL)
            break;
        st = st_parse_all(buf, cut, &err);
        CHECK((st == MLU_OK) == (cut == n));
        CHECK(st == MLU_OK || (st == MLU_EFORMAT && err.text[0] != '\0'));
        if (cut == n - 1)
            CHECK(strstr(err.text, "incomplete buffer") != NULL);
        free(buf);
    }
    /* as a file: the header through pread, then the last tensor's bytes to the last byte */
    CHECK(write_file(path, img.data, n) == 0);
    mlu_error_clear(&err);
    CHECK(mlu_file_open_ro(path, &fd, &size, &err) == MLU_OK && size == n);
    if (fd >= 0) {
        CHECK(mlu_st_read_header(fd, size, &h, &err) == MLU_OK);
        if (err.code == MLU_OK) {
            const mlu_st_tensor *t = &h.tensors[h.ntensors - 1];
            uint64_t end = h.data_start + t->end;
            CHECK(end == n && t->end - t->begin == sizeof(last));
            CHECK(mlu_file_read_at(fd, h.data_start + t->begin, last, sizeof(last), "b", &err) == MLU_OK);
            CHECK(memcmp(last, VALUES, sizeof(last)) == 0);
            CHECK(mlu_file_read_at(fd, h.data_start + t->begin + 1, last, sizeof(last), "b", &err) == MLU_EFORMAT);
            mlu_st_header_free(&h);
        }
        close(fd);
    }
    CHECK(truncate(path, (off_t)n - 1) == 0);
    mlu_error_clear(&err);
    CHECK(mlu_file_open_ro(path, &fd, &size, &err) == MLU_OK && size == n - 1);
    if (fd >= 0) {
        CHECK(mlu_st_read_header(fd, size, &h, &err) == MLU_EFORMAT);
        CHECK(strstr(err.text, "incomplete buffer") != NULL);
        close(fd);
    }
    unlink(path);
    mlu_buf_free(&img);
}

int main(void)
{
    test_rd_read_bounds();
    test_pt_zip();
    test_pt_legacy();
    test_safetensors();
    return TEST_DONE("test_read_bounds");
}
