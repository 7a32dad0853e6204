#define _GNU_SOURCE
/* Unit tests of the shared core pieces: buffer, JSON helpers, atomic files,
 * checksum, allocation-failure injection, byte reads, UTF-8, index sort. */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "mlu_test.h"
#include "core/alloc.h"
#include "core/atomicfile.h"
#include "core/buf.h"
#include "core/bytes.h"
#include "core/checksum.h"
#include "core/json.h"

static void test_put_string(void)
{
    mlu_buf b = MLU_BUF_INIT;
    mlu_error err;
    mlu_error_clear(&err);
    CHECK(mlu_json_put_string(&b, "a\"b\\c\n\x01\x7f/\xc3\xa9", 11, &err) == MLU_OK);
    CHECK(b.len == strlen("\"a\\\"b\\\\c\\n\\u0001\x7f/\xc3\xa9\""));
    CHECK(memcmp(b.data, "\"a\\\"b\\\\c\\n\\u0001\x7f/\xc3\xa9\"", b.len) == 0);
    mlu_buf_free(&b);
}

static void check_trunc(const char *in, const char *want)
{
    mlu_buf b = MLU_BUF_INIT;
    mlu_error err;
    mlu_error_clear(&err);
    CHECK(mlu_json_truncate_text(in, strlen(in), &b, &err) == MLU_OK);
    CHECK(b.len == strlen(want) && memcmp(b.data, want, b.len) == 0);
    if (!(b.len == strlen(want) && memcmp(b.data, want, b.len) == 0))
        fprintf(stderr, "  got '%.*s' want '%s'\n", (int)b.len, b.data ? b.data : "", want);
    mlu_buf_free(&b);
}

static void test_truncate(void)
{
    check_trunc("[0.123456789, 0.1234567, -2.000000005, 1.23456789e-05]",
                "[0.1235, 0.1234567, -2.0000, 1.2346e-05]");
    check_trunc("{\"k0.123456789\": \"0.123456789\", \"v\": 12.999999999}",
                "{\"k0.123456789\": \"0.123456789\", \"v\": 13.0000}");
    check_trunc("\"unterminated 0.123456789", "\"unterminated 0.123456789");
}

static void test_parse(void)
{
    mlu_json_doc doc;
    mlu_error err;
    const char *bad = "{\"a\": 1,\n \"b\": ]}";
    const char *dup = "{\"a\": 1, \"a\": 2}";
    const char *nf = "[NaN, \"\\u0000x\", -Infinity]";
    const char *s;
    size_t n;
    double d = 0;
    char *tmp = NULL;

    mlu_error_clear(&err);
    CHECK(mlu_json_parse(bad, strlen(bad), 0, &doc, &err) == MLU_EFORMAT);
    CHECK(err.line == 2);
    CHECK(err.offset == 7 + 8);
    mlu_error_clear(&err);
    CHECK(mlu_json_parse(dup, strlen(dup), 0, &doc, &err) == MLU_EFORMAT);
    mlu_error_clear(&err);
    CHECK(mlu_json_parse(nf, strlen(nf), 0, &doc, &err) == MLU_EFORMAT);
    mlu_error_clear(&err);
    CHECK(mlu_json_parse(nf, strlen(nf), MLU_JSON_ALLOW_NONFINITE, &doc, &err) == MLU_OK);
    CHECK(json_array_size(doc.root) == 3);
    CHECK(mlu_json_string_value(&doc, json_array_get(doc.root, 0), &s, &n, &d, &tmp, &err) == 1);
    CHECK(d != d);
    CHECK(mlu_json_string_value(&doc, json_array_get(doc.root, 1), &s, &n, &d, &tmp, &err) == 0);
    CHECK(n == 2 && s[0] == '\0' && s[1] == 'x');
    mlu_free(tmp);
    mlu_json_doc_free(&doc);
}

static void test_atomic(void)
{
    char dir[] = "/tmp/mlu_test_XXXXXX";
    char path[256];
    char *data = NULL;
    size_t len = 0;
    mlu_error err;
    mlu_afile f;

    CHECK(mkdtemp(dir) != NULL);
    snprintf(path, sizeof(path), "%s/out.json", dir);
    mlu_error_clear(&err);
    CHECK(mlu_write_file_atomic(path, "old", 3, MLU_AFILE_DURABLE, &err) == MLU_OK);
    /* an aborted write leaves the old file and no temp file behind */
    CHECK(mlu_afile_open(&f, path, MLU_AFILE_DURABLE, &err) == MLU_OK);
    CHECK(mlu_afile_write(&f, "new!", 4, &err) == MLU_OK);
    mlu_afile_abort(&f);
    CHECK(mlu_read_file(path, &data, &len, &err) == MLU_OK);
    CHECK(len == 3 && memcmp(data, "old", 3) == 0);
    mlu_free(data);
    CHECK(mlu_write_file_atomic(path, "new!", 4, MLU_AFILE_DURABLE, &err) == MLU_OK);
    CHECK(mlu_read_file(path, &data, &len, &err) == MLU_OK);
    CHECK(len == 4 && memcmp(data, "new!", 4) == 0);
    mlu_free(data);
    /* not durable: still atomic (an aborted write leaves the old file), same bytes */
    CHECK(mlu_afile_open(&f, path, 0, &err) == MLU_OK);
    CHECK(f.flags == 0);
    CHECK(mlu_afile_write(&f, "lost", 4, &err) == MLU_OK);
    mlu_afile_abort(&f);
    CHECK(mlu_write_file_atomic(path, "fast!", 5, 0, &err) == MLU_OK);
    CHECK(mlu_read_file(path, &data, &len, &err) == MLU_OK);
    CHECK(len == 5 && memcmp(data, "fast!", 5) == 0);
    mlu_free(data);
    /* an unknown flag is the caller's error, before anything is written */
    mlu_error_clear(&err);
    CHECK(mlu_write_file_atomic(path, "bad", 3, 0x80u, &err) == MLU_EINVAL);
    CHECK(mlu_read_file(path, &data, &len, &err) == MLU_OK);
    CHECK(len == 5 && memcmp(data, "fast!", 5) == 0);
    mlu_free(data);
    unlink(path);
    rmdir(dir);
    mlu_error_clear(&err);
    CHECK(mlu_read_file("/nonexistent/x", &data, &len, &err) == MLU_EIO);
    CHECK(err.sys_errno != 0);
}

static int exists(const char *dir, const char *name)
{
    char p[512];
    struct stat sb;

    snprintf(p, sizeof(p), "%s/%s", dir, name);
    return lstat(p, &sb) == 0;
}

static void touch(const char *dir, const char *name)
{
    char p[512];
    FILE *f;

    snprintf(p, sizeof(p), "%s/%s", dir, name);
    f = fopen(p, "w");
    CHECK(f != NULL);
    if (f != NULL)
        fclose(f);
}

/* Stale temp files of the target are reaped, a locked one and other names
 * are not; FIFOs and devices are written in place (atomicfile.h). */
static void test_atomic_reap_and_special(void)
{
    char dir[] = "/tmp/mlu_test_XXXXXX";
    char path[256], fifo[256], held[256], buf[16];
    mlu_error err;
    struct stat sb;
    int rfd, hfd;
    ssize_t got;

    CHECK(mkdtemp(dir) != NULL);
    snprintf(path, sizeof(path), "%s/out.json", dir);
    touch(dir, ".out.json.aB3xY9.tmp");
    touch(dir, ".out.json.aB3xY.tmp");
    touch(dir, ".out.jsonX.aB3xY9.tmp");
    touch(dir, ".out.json.hEld00.tmp");
    snprintf(held, sizeof(held), "%s/.out.json.hEld00.tmp", dir);
    hfd = open(held, O_RDONLY);
    CHECK(hfd >= 0 && flock(hfd, LOCK_EX) == 0);
    mlu_error_clear(&err);
    CHECK(mlu_write_file_atomic(path, "new", 3, MLU_AFILE_DURABLE, &err) == MLU_OK);
    CHECK(!exists(dir, ".out.json.aB3xY9.tmp"));
    CHECK(exists(dir, ".out.json.aB3xY.tmp") && exists(dir, ".out.jsonX.aB3xY9.tmp"));
    CHECK(exists(dir, ".out.json.hEld00.tmp"));
    close(hfd);
    CHECK(mlu_write_file_atomic(path, "new", 3, MLU_AFILE_DURABLE, &err) == MLU_OK);
    CHECK(!exists(dir, ".out.json.hEld00.tmp"));

    /* a FIFO with a reader: written into, still a FIFO */
    snprintf(fifo, sizeof(fifo), "%s/pipe", dir);
    CHECK(mkfifo(fifo, 0600) == 0);
    rfd = open(fifo, O_RDONLY | O_NONBLOCK);
    CHECK(rfd >= 0);
    CHECK(mlu_write_file_atomic(fifo, "fifo!", 5, 0, &err) == MLU_OK);
    got = read(rfd, buf, sizeof(buf));
    CHECK(got == 5 && memcmp(buf, "fifo!", 5) == 0);
    CHECK(lstat(fifo, &sb) == 0 && S_ISFIFO(sb.st_mode));
    close(rfd);
    /* a folder is refused before anything is written */
    mlu_error_clear(&err);
    CHECK(mlu_write_file_atomic(dir, "x", 1, 0, &err) == MLU_EIO && err.sys_errno == EISDIR);

    unlink(fifo);
    unlink(path);
    snprintf(path, sizeof(path), "%s/.out.json.aB3xY.tmp", dir);
    unlink(path);
    snprintf(path, sizeof(path), "%s/.out.jsonX.aB3xY9.tmp", dir);
    unlink(path);
    CHECK(rmdir(dir) == 0);
}

static void test_alloc_failures(void)
{
    /* Every allocation of a parse-and-escape round fails in turn: each must
     * report ENOMEM (or succeed), never crash or leak. */
    long n;
    for (n = 0; n < 64; n++) {
        mlu_buf b = MLU_BUF_INIT;
        mlu_error err;
        mlu_status st;
        mlu_error_clear(&err);
        mlu_alloc_fail_after(n);
        st = mlu_json_truncate_text("[NaN, 0.123456789]", 18, &b, &err);
        if (st == MLU_OK)
            st = mlu_json_put_string(&b, "x\ny", 3, &err);
        CHECK(st == MLU_OK || st == MLU_ENOMEM);
        mlu_alloc_fail_after(-1);
        mlu_buf_free(&b);
    }
}

static void test_grow(void)
{
    mlu_error err;
    size_t cap = 0, i;
    int32_t *a = NULL;
    char *bytes = NULL;
    void *p;

    /* the first growth gives the minimum: 16 entries, and 64 bytes' worth */
    mlu_error_clear(&err);
    CHECK(mlu_grow((void **)&a, &cap, 1, sizeof(*a), SIZE_MAX, "ints", &err) == MLU_OK);
    CHECK(a != NULL && cap == MLU_GROW_MIN);
    for (i = 0; i < cap; i++)
        a[i] = (int32_t)i;
    cap = 0;
    CHECK(mlu_grow((void **)&bytes, &cap, 3, 1, SIZE_MAX, "bytes", &err) == MLU_OK && cap == MLU_GROW_MIN_BYTES);
    mlu_free(bytes);

    /* need <= cap: nothing allocated */
    cap = MLU_GROW_MIN;
    mlu_alloc_fail_after(0);
    CHECK(mlu_grow((void **)&a, &cap, MLU_GROW_MIN, sizeof(*a), SIZE_MAX, "ints", &err) == MLU_OK);
    CHECK(mlu_alloc_count() == 0 && cap == MLU_GROW_MIN);

    /* an allocation failure leaves the array and its capacity alone */
    CHECK(mlu_grow((void **)&a, &cap, MLU_GROW_MIN + 1, sizeof(*a), SIZE_MAX, "ints", &err) == MLU_ENOMEM);
    mlu_alloc_fail_after(-1);
    CHECK(cap == MLU_GROW_MIN && a[MLU_GROW_MIN - 1] == MLU_GROW_MIN - 1);
    CHECK(strstr(err.text, "out of memory growing ints to 32 entries (128 bytes)") != NULL);

    /* doubling, enough for need, contents kept */
    mlu_error_clear(&err);
    CHECK(mlu_grow((void **)&a, &cap, MLU_GROW_MIN + 1, sizeof(*a), SIZE_MAX, "ints", &err) == MLU_OK);
    CHECK(cap == 2 * MLU_GROW_MIN && a[5] == 5 && a[MLU_GROW_MIN - 1] == MLU_GROW_MIN - 1);
    CHECK(mlu_grow((void **)&a, &cap, 100, sizeof(*a), SIZE_MAX, "ints", &err) == MLU_OK && cap == 128);

    /* max bounds the capacity and need */
    CHECK(mlu_grow((void **)&a, &cap, 129, sizeof(*a), 200, "ints", &err) == MLU_OK && cap == 200);
    CHECK(mlu_grow((void **)&a, &cap, 201, sizeof(*a), 200, "ints", &err) == MLU_EOVERFLOW);
    CHECK(cap == 200 && a[5] == 5);
    CHECK(strstr(err.text, "ints: 201 entries of 4 bytes are more than the 200 it can hold") != NULL);

    /* need * elsize overflows size_t: refused before any allocation */
    mlu_error_clear(&err);
    mlu_alloc_fail_after(0);
    CHECK(mlu_grow((void **)&a, &cap, SIZE_MAX / 8 + 1, 8, SIZE_MAX, "ints", &err) == MLU_EOVERFLOW);
    CHECK(mlu_grow((void **)&a, &cap, SIZE_MAX, sizeof(*a), SIZE_MAX, "ints", NULL) == MLU_EOVERFLOW);
    CHECK(mlu_alloc_count() == 0 && cap == 200);

    /* doubling past SIZE_MAX / 2 stops at the largest count that fits (the
     * allocation is made to fail, so no such memory is asked of the system) */
    mlu_error_clear(&err);
    p = a;
    cap = SIZE_MAX / 2 + 1;
    CHECK(mlu_grow(&p, &cap, SIZE_MAX / 2 + 2, 1, SIZE_MAX, "bytes", &err) == MLU_ENOMEM);
    CHECK(mlu_alloc_count() == 1 && p == a && cap == SIZE_MAX / 2 + 1);
    {
        char want[96];
        snprintf(want, sizeof(want), "to %zu entries (%zu bytes)", (size_t)SIZE_MAX, (size_t)SIZE_MAX);
        CHECK(strstr(err.text, want) != NULL);
    }
    mlu_error_clear(&err);
    mlu_alloc_fail_after(0);
    cap = SIZE_MAX / 16 + 1;  /* 8-byte entries: doubling would pass SIZE_MAX / 8 */
    CHECK(mlu_grow(&p, &cap, cap + 1, 8, SIZE_MAX, "longs", &err) == MLU_ENOMEM);
    {
        char want[96];
        snprintf(want, sizeof(want), "to %zu entries", (size_t)SIZE_MAX / 8);
        CHECK(strstr(err.text, want) != NULL);
    }
    mlu_alloc_fail_after(-1);

    /* 0-byte entries are a caller's mistake */
    mlu_error_clear(&err);
    cap = 0;
    CHECK(mlu_grow(&p, &cap, 1, 0, SIZE_MAX, "nothing", &err) == MLU_EINVAL && p == a);
    mlu_free(a);
}

static void test_parse_out_of_memory(void)
{
    /* jansson's own allocations fail in turn.  It says nothing at all when
     * some of them fail: that must come out as ENOMEM with a message, never
     * as a silent format error.  (When it fails to copy a string it reports
     * a syntax error itself; that one keeps its message.) */
    const char *text = "{\"a\": [1, {\"b\": NaN}], \"c\": \"x\"}";
    long n;
    int nomem = 0;
    json_set_alloc_funcs(mlu_malloc, mlu_free);
    for (n = 0; n < 64; n++) {
        mlu_json_doc doc;
        mlu_error err;
        mlu_status st;
        mlu_error_clear(&err);
        mlu_alloc_fail_after(n);
        st = mlu_json_parse(text, strlen(text), MLU_JSON_ALLOW_NONFINITE, &doc, &err);
        mlu_alloc_fail_after(-1);
        CHECK(st == MLU_OK || st == MLU_ENOMEM || st == MLU_EFORMAT);
        CHECK(st == MLU_OK || err.text[0] != '\0');
        nomem += st == MLU_ENOMEM;
        if (st == MLU_OK)
            mlu_json_doc_free(&doc);
    }
    CHECK(nomem >= 10);
    json_set_alloc_funcs(malloc, free);
}

static void test_checksum(void)
{
    unsigned char b[3] = {1, 2, 3};
    CHECK(mlu_checksum64(b, 3) == 1 * 1 + 2 * 3 + 3 * 5);
    CHECK(mlu_checksum64(b, 0) == 0);
}

static void test_le_reads(void)
{
    static const uint8_t b[8] = {0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0xF8};
    CHECK(mlu_le16(b) == 0x0201u);
    CHECK(mlu_le32(b) == 0x04030201u);
    CHECK(mlu_le32(b + 4) == 0xF8070605u);
    CHECK(mlu_le64(b) == 0xF807060504030201ull);
}

/* Each case: the bytes, and where the first invalid sequence starts (strict,
 * then with surrogates allowed); the length when it is all valid. */
static void test_utf8(void)
{
    static const struct { const char *s; size_t n, strict, lax; } cases[] = {
        {"", 0, 0, 0},
        {"abc", 3, 3, 3},
        {"a\xc3\xa9" "b", 4, 4, 4},                      /* U+00E9 */
        {"\xe2\x82\xac", 3, 3, 3},                    /* U+20AC */
        {"\xf0\x9f\x98\x80!", 5, 5, 5},              /* U+1F600 */
        {"ab\x80", 3, 2, 2},                           /* a lone continuation byte */
        {"\xc0\x80", 2, 0, 0},                         /* overlong NUL */
        {"\xe0\x80\xaf", 3, 0, 0},                     /* overlong '/' */
        {"\xf0\x82\x82\xac", 4, 0, 0},                 /* overlong U+20AC */
        {"\xf4\x90\x80\x80", 4, 0, 0},                 /* above U+10FFFF */
        {"x\xed\xa0\x80", 4, 1, 4},                    /* a surrogate: only with surrogatepass */
        {"\xc3", 1, 0, 0},                              /* cut short */
        {"z\xe2\x82", 3, 1, 1},
        {"\xc3(", 2, 0, 0},                             /* not a continuation */
        {"\xff", 1, 0, 0},
    };
    size_t i;
    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        const uint8_t *p = (const uint8_t *)cases[i].s;
        CHECK(mlu_utf8_invalid_at(p, cases[i].n, 0) == cases[i].strict);
        CHECK(mlu_utf8_invalid_at(p, cases[i].n, 1) == cases[i].lax);
    }
}

static void test_bytes_cmp(void)
{
    CHECK(mlu_bytes_cmp("ab", 2, "ab", 2) == 0);
    CHECK(mlu_bytes_cmp("ab", 2, "abc", 3) < 0);
    CHECK(mlu_bytes_cmp("abc", 3, "ab", 2) > 0);
    CHECK(mlu_bytes_cmp("b", 1, "ab", 2) > 0);
    CHECK(mlu_bytes_cmp("\xff", 1, "\x01", 1) > 0); /* unsigned bytes */
    CHECK(mlu_bytes_cmp("", 0, "", 0) == 0);
}

static int cmp_u32(const void *ctx, size_t x, size_t y)
{
    const uint32_t *keys = ctx;
    return keys[x] < keys[y] ? -1 : keys[x] > keys[y];
}

/* Random keys (many repeated) of every length up to 70: sorted, and each
 * index once. */
static void test_sort_indices(void)
{
    uint32_t keys[70];
    size_t v[70], n, i;
    uint64_t rng = 0x9E3779B97F4A7C15ull;
    int sorted = 1, perm = 1;

    for (n = 0; n <= 70; n++) {
        unsigned seen[70] = {0};
        for (i = 0; i < n; i++) {
            keys[i] = (uint32_t)(mlu_test_rand(&rng) % (n / 3 + 1));
            v[i] = i;
        }
        mlu_sort_indices(v, n, cmp_u32, keys);
        for (i = 0; i < n; i++) {
            seen[v[i]]++;
            if (i > 0 && keys[v[i - 1]] > keys[v[i]])
                sorted = 0;
        }
        for (i = 0; i < n; i++)
            perm &= seen[i] == 1;
    }
    CHECK(sorted);
    CHECK(perm);
}

/* Files fstat cannot size are read to EOF, the buffer growing: a FIFO fed
 * 20000 bytes by a child, and an empty regular file. */
static void test_read_file_to_eof(void)
{
    char dir[] = "/tmp/mlu_readXXXXXX", path[256];
    char *data = NULL;
    size_t len = 0, i;
    mlu_error err;
    pid_t pid;
    int ok = 1, status = 0;

    CHECK(mkdtemp(dir) != NULL);
    snprintf(path, sizeof(path), "%s/fifo", dir);
    CHECK(mkfifo(path, 0600) == 0);
    pid = fork();
    if (pid == 0) {
        int fd = open(path, O_WRONLY);
        char chunk[1000];
        for (i = 0; i < sizeof(chunk); i++)
            chunk[i] = (char)('a' + i % 26);
        for (i = 0; fd >= 0 && i < 20; i++)
            if (write(fd, chunk, sizeof(chunk)) != (ssize_t)sizeof(chunk))
                _exit(1);
        _exit(fd >= 0 ? 0 : 1);
    }
    mlu_error_clear(&err);
    CHECK(mlu_read_file(path, &data, &len, &err) == MLU_OK);
    CHECK(waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0);
    CHECK(len == 20000 && data != NULL && data[len] == '\0');
    for (i = 0; data != NULL && i < len; i++)
        ok &= data[i] == (char)('a' + (i % 1000) % 26);
    CHECK(ok);
    mlu_free(data);
    unlink(path);
    snprintf(path, sizeof(path), "%s/empty", dir);
    CHECK(mlu_write_file_atomic(path, "", 0, 0, &err) == MLU_OK);
    CHECK(mlu_read_file(path, &data, &len, &err) == MLU_OK);
    CHECK(len == 0 && data != NULL && data[0] == '\0');
    mlu_free(data);
    unlink(path);
    rmdir(dir);
}

int main(void)
{
    test_put_string();
    test_truncate();
    test_parse();
    test_atomic();
    test_atomic_reap_and_special();
    test_alloc_failures();
    test_grow();
    test_parse_out_of_memory();
    test_checksum();
    test_le_reads();
    test_utf8();
    test_bytes_cmp();
    test_sort_indices();
    test_read_file_to_eof();
    return TEST_DONE("test_core");
}
