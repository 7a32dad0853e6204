/* Unit tests of the .pt writer's pure core: pickle opcodes, integer
 * selection, memo, zip padding, CRC, zip64 records, allocation failures. */
#include <stdlib.h>
#include <string.h>

#include "mlu_test.h"
#include "core/alloc.h"
#include "core/buf.h"
#include "core/bytes.h"
#include "core/pickle_write.h"
#include "core/ptsave_id.h"
#include "core/zipwrite.h"

static int int_bytes(int64_t v, const char *want, size_t n)
{
    mlu_pkw w;
    mlu_error err;
    int ok;

    mlu_error_clear(&err);
    mlu_pkw_init(&w);
    ok = mlu_pkw_int(&w, v, &err) == MLU_OK && w.buf.len == n && memcmp(w.buf.data, want, n) == 0;
    if (!ok)
        fprintf(stderr, "  int %lld: got %zu bytes\n", (long long)v, w.buf.len);
    mlu_pkw_free(&w);
    return ok;
}

static void test_ints(void)
{
    CHECK(int_bytes(0, "K\x00", 2));
    CHECK(int_bytes(255, "K\xff", 2));
    CHECK(int_bytes(256, "M\x00\x01", 3));
    CHECK(int_bytes(65535, "M\xff\xff", 3));
    CHECK(int_bytes(65536, "J\x00\x00\x01\x00", 5));
    CHECK(int_bytes(-1, "J\xff\xff\xff\xff", 5));
    CHECK(int_bytes(INT32_MIN, "J\x00\x00\x00\x80", 5));
    CHECK(int_bytes(INT32_MAX, "J\xff\xff\xff\x7f", 5));
    CHECK(int_bytes((int64_t)INT32_MAX + 1, "\x8a\x05\x00\x00\x00\x80\x00", 7));
    CHECK(int_bytes((int64_t)INT32_MIN - 1, "\x8a\x05\xff\xff\xff\x7f\xff", 7));
    CHECK(int_bytes(-((int64_t)1 << 32), "\x8a\x05\x00\x00\x00\x00\xff", 7));
    CHECK(int_bytes(INT64_MAX, "\x8a\x08\xff\xff\xff\xff\xff\xff\xff\x7f", 10));
    CHECK(int_bytes(INT64_MIN, "\x8a\x08\x00\x00\x00\x00\x00\x00\x00\x80", 10));
    CHECK(int_bytes((int64_t)1 << 40, "\x8a\x06\x00\x00\x00\x00\x00\x01", 8));
}

static void test_ops_and_memo(void)
{
    mlu_pkw w;
    mlu_error err;
    uint32_t idx = 99, i;
    int ok = 1;

    mlu_error_clear(&err);
    mlu_pkw_init(&w);
    CHECK(mlu_pkw_proto(&w, &err) == MLU_OK);
    CHECK(mlu_pkw_global(&w, "collections", "OrderedDict", &err) == MLU_OK);
    CHECK(mlu_pkw_put(&w, &idx, &err) == MLU_OK && idx == 0);
    CHECK(mlu_pkw_unicode(&w, "w", 1, &err) == MLU_OK);
    CHECK(mlu_pkw_float(&w, 1.0, &err) == MLU_OK);
    CHECK(mlu_pkw_bool(&w, 0, &err) == MLU_OK);
    CHECK(mlu_pkw_get(&w, 0, &err) == MLU_OK);
    CHECK(mlu_pkw_op(&w, MLU_PKOP_STOP, &err) == MLU_OK);
    {
        const char want[] = "\x80\x02" "ccollections\nOrderedDict\n" "q\x00" "X\x01\x00\x00\x00w"
                            "G\x3f\xf0\x00\x00\x00\x00\x00\x00" "\x89" "h\x00" ".";
        CHECK(w.buf.len == sizeof(want) - 1 && memcmp(w.buf.data, want, sizeof(want) - 1) == 0);
    }
    /* BINGET of an index never put is refused; so is a global with a newline. */
    CHECK(mlu_pkw_get(&w, 5, &err) == MLU_EINVAL);
    mlu_error_clear(&err);
    CHECK(mlu_pkw_global(&w, "a\nb", "c", &err) == MLU_EINVAL);
    mlu_pkw_free(&w);

    /* BINPUT up to 255, LONG_BINPUT after; the same for gets. */
    mlu_error_clear(&err);
    mlu_pkw_init(&w);
    for (i = 0; i < 300; i++) {
        size_t before = w.buf.len;
        ok &= mlu_pkw_put(&w, &idx, &err) == MLU_OK && idx == i;
        ok &= (w.buf.len - before) == (i < 256 ? 2u : 5u);
        ok &= (unsigned char)w.buf.data[before] == (i < 256 ? 'q' : 'r');
    }
    CHECK(ok);
    CHECK(memcmp(w.buf.data + w.buf.len - 5, "r\x2b\x01\x00\x00", 5) == 0); /* 299 */
    CHECK(mlu_pkw_get(&w, 256, &err) == MLU_OK);
    CHECK(memcmp(w.buf.data + w.buf.len - 5, "j\x00\x01\x00\x00", 5) == 0);
    CHECK(mlu_pkw_get(&w, 255, &err) == MLU_OK);
    CHECK(memcmp(w.buf.data + w.buf.len - 2, "h\xff", 2) == 0);
    mlu_pkw_free(&w);
}

static void test_padding_and_crc(void)
{
    uint64_t lim = MLU_ZIP64_LIMIT, off;
    size_t n;
    int ok = 1;

    CHECK(mlu_zip_padding(0, 21, 100, 64, lim) == 9); /* batch_norm2d/data.pkl */
    for (off = 0; off < 500; off += 3)
        for (n = 1; n < 70; n++)
            ok &= (off + 30 + n + 4 + mlu_zip_padding(off, n, 10, 64, lim)) % 64 == 0;
    CHECK(ok);
    CHECK((lim + 30 + 9 + 4 + 12 + mlu_zip_padding(lim, 9, 10, 64, lim)) % 64 == 0);
    CHECK((0 + 30 + 9 + 4 + 20 + mlu_zip_padding(0, 9, lim, 64, lim)) % 64 == 0);
    CHECK((lim + 30 + 9 + 4 + 28 + mlu_zip_padding(lim, 9, lim, 64, lim)) % 64 == 0);
    CHECK(mlu_zip_padding(lim - 1, 9, 10, 64, lim) == (64 - (lim - 1 + 43) % 64) % 64);
    CHECK(mlu_crc32(0, "123456789", 9) == 0xCBF43926u);
    CHECK(mlu_crc32(mlu_crc32(0, "1234", 4), "56789", 5) == 0xCBF43926u);
    CHECK(mlu_crc32(0, "", 0) == 0);
}

static mlu_status to_buf(void *ctx, const void *p, size_t n, mlu_error *err)
{
    return mlu_buf_append((mlu_buf *)ctx, p, n, err);
}

static int fail_after_bytes = -1;
static mlu_status failing_sink(void *ctx, const void *p, size_t n, mlu_error *err)
{
    if (fail_after_bytes >= 0 && ((mlu_buf *)ctx)->len + n > (size_t)fail_after_bytes)
        return mlu_error_set(err, MLU_EIO, -1, "disk full");
    return mlu_buf_append((mlu_buf *)ctx, p, n, err);
}

/* Builds a small archive; returns its bytes in *out. */
static mlu_status build(mlu_buf *out, uint64_t limit, mlu_zipw_sink sink)
{
    mlu_zipw w;
    mlu_error err;
    mlu_status st;
    static const char data[300] = {1, 2, 3};

    mlu_error_clear(&err);
    st = mlu_zipw_init(&w, "arch", sink, out, &err);
    if (st == MLU_OK) {
        w.zip64_limit = limit;
        st = mlu_zipw_record(&w, "data.pkl", "\x80\x02N.", 4, &err);
    }
    if (st == MLU_OK)
        st = mlu_zipw_record(&w, "data/0", data, 0, &err);
    if (st == MLU_OK)
        st = mlu_zipw_begin(&w, "data/1", sizeof(data), &err);
    if (st == MLU_OK)
        st = mlu_zipw_data(&w, data, 100, &err);
    if (st == MLU_OK)
        st = mlu_zipw_data(&w, data + 100, 200, &err);
    if (st == MLU_OK)
        st = mlu_zipw_end(&w, &err);
    if (st == MLU_OK)
        st = mlu_zipw_finish(&w, &err);
    mlu_zipw_free(&w);
    return st;
}

static void test_archive(uint64_t limit)
{
    mlu_buf b = MLU_BUF_INIT;
    const unsigned char *z, *e64, *loc, *eocd, *cd;
    uint64_t cd_off, cd_size, off;
    int i;

    CHECK(build(&b, limit, to_buf) == MLU_OK);
    z = (const unsigned char *)b.data;
    eocd = z + b.len - 22;
    loc = eocd - 20;
    e64 = loc - 56;
    CHECK(mlu_le32(eocd) == 0x06054b50u && mlu_le32(loc) == 0x07064b50u && mlu_le32(e64) == 0x06064b50u);
    CHECK(mlu_le64(loc + 8) == (uint64_t)(e64 - z) && mlu_le32(loc + 16) == 1);
    CHECK(mlu_le64(e64 + 4) == 44 && mlu_le16(e64 + 12) == 0x031E && mlu_le16(e64 + 14) == 0x002D);
    CHECK(mlu_le64(e64 + 24) == 3 && mlu_le64(e64 + 32) == 3 && mlu_le16(eocd + 8) == 3);
    cd_off = mlu_le64(e64 + 48);
    cd_size = mlu_le64(e64 + 40);
    CHECK(cd_off + cd_size == (uint64_t)(e64 - z));
    /* the first record: local header at 0, payload at 64 */
    CHECK(mlu_le32(z) == 0x04034b50u && mlu_le16(z + 4) == 0 && mlu_le16(z + 6) == 0x0808 && mlu_le16(z + 8) == 0);
    CHECK(mlu_le32(z + 14) == 0 && mlu_le32(z + 18) == 0 && mlu_le32(z + 22) == 0 && mlu_le16(z + 26) == 13);
    cd = z + cd_off;
    for (i = 0; i < 3; i++) {
        uint16_t nlen = mlu_le16(cd + 28), xlen = mlu_le16(cd + 30), lx;
        uint32_t size32 = mlu_le32(cd + 24), off32 = mlu_le32(cd + 42);
        uint64_t size = size32, start;
        const unsigned char *lfh, *x = cd + 46 + nlen;
        int big, far;
        CHECK(mlu_le32(cd) == 0x02014b50u);
        off = off32;
        if (xlen > 0) {
            size_t k = 4;
            CHECK(mlu_le16(x) == 1 && mlu_le16(x + 2) == xlen - 4);
            if (size32 == 0xFFFFFFFFu) {
                size = mlu_le64(x + k);
                CHECK(mlu_le64(x + k + 8) == size);
                k += 16;
            }
            if (off32 == 0xFFFFFFFFu)
                off = mlu_le64(x + k);
        }
        big = size >= limit;
        far = off >= limit;
        CHECK((xlen > 0) == (big || far));
        lfh = z + off;
        CHECK(mlu_le32(lfh) == 0x04034b50u && memcmp(lfh + 30, cd + 46, nlen) == 0);
        lx = mlu_le16(lfh + 28);
        start = off + 30 + nlen + lx;
        CHECK(start % 64 == 0);
        CHECK(mlu_le16(lfh + 6) == (size ? 0x0808 : 0x0800) && mlu_le16(cd + 8) == mlu_le16(lfh + 6));
        CHECK(mlu_crc32(0, z + start, (size_t)size) == mlu_le32(cd + 16));
        if (big || far)
            CHECK(mlu_le16(lfh + 30 + nlen) == 1);
        /* the FB field is last and its padding is all 'Z' */
        {
            const unsigned char *fb = lfh + 30 + nlen + ((big || far) ? 4 + (big ? 16 : 0) + (far ? 8 : 0) : 0);
            uint16_t pad = mlu_le16(fb + 2);
            int zs = 1, j;
            CHECK(fb[0] == 'F' && fb[1] == 'B' && fb + 4 + pad == z + start);
            for (j = 0; j < pad; j++)
                zs &= fb[4 + j] == 'Z';
            CHECK(zs);
        }
        if (size > 0) {
            const unsigned char *dd = z + start + size;
            CHECK(mlu_le32(dd) == 0x08074b50u && mlu_le32(dd + 4) == mlu_le32(cd + 16));
            if (big || far)
                CHECK(mlu_le64(dd + 8) == size && mlu_le64(dd + 16) == size);
            else
                CHECK(mlu_le32(dd + 8) == size && mlu_le32(dd + 12) == size);
        }
        cd += 46 + nlen + xlen;
    }
    mlu_buf_free(&b);
}

static void test_misuse_and_failures(void)
{
    mlu_zipw w;
    mlu_buf b = MLU_BUF_INIT;
    mlu_error err;
    long n;
    int ok = 1, failures = 0;

    mlu_error_clear(&err);
    CHECK(mlu_zipw_init(&w, "", to_buf, &b, &err) == MLU_EINVAL);
    mlu_zipw_free(&w);
    mlu_error_clear(&err);
    CHECK(mlu_zipw_init(&w, "a", to_buf, &b, &err) == MLU_OK);
    CHECK(mlu_zipw_data(&w, "x", 1, &err) == MLU_EINVAL);
    mlu_error_clear(&err);
    CHECK(mlu_zipw_begin(&w, "r", 2, &err) == MLU_OK);
    CHECK(mlu_zipw_data(&w, "xyz", 3, &err) == MLU_EINVAL);
    mlu_error_clear(&err);
    CHECK(mlu_zipw_end(&w, &err) == MLU_EINVAL); /* 2 bytes short */
    mlu_error_clear(&err);
    CHECK(mlu_zipw_finish(&w, &err) == MLU_EINVAL); /* still open */
    mlu_zipw_free(&w);
    mlu_buf_free(&b);

    /* A sink that fails at every possible point fails the whole build. */
    for (fail_after_bytes = 0; fail_after_bytes < 900; fail_after_bytes += 7) {
        mlu_status st = build(&b, MLU_ZIP64_LIMIT, failing_sink);
        ok &= st == MLU_EIO || (st == MLU_OK && b.len <= (size_t)fail_after_bytes);
        mlu_buf_free(&b);
    }
    fail_after_bytes = -1;
    CHECK(ok);

    /* Allocation failures at each step give MLU_ENOMEM, never a crash. */
    for (n = 0; n < 100; n++) {
        mlu_status st;
        mlu_alloc_fail_after(n);
        st = build(&b, 1, to_buf);
        mlu_alloc_fail_after(-1);
        mlu_buf_free(&b);
        if (st == MLU_OK)
            break;
        ok &= st == MLU_ENOMEM;
        failures++;
    }
    CHECK(ok && failures > 2 && n < 100);
}

static void test_serialization_id(void)
{
    /* A real torch.save of a two-tensor state dict to model.pt. */
    const char *names[] = {"data.pkl", ".format_version", ".storage_alignment", "byteorder",
                           "data/0", "data/1", "version"};
    const uint32_t crcs[] = {813731512u, 2212294583u, 3916527423u, 434322821u, 775923062u,
                             1334598860u, 1432854225u};
    const uint64_t sizes[] = {297, 1, 2, 6, 8, 24, 2};
    char id[41];
    mlu_error err;

    mlu_error_clear(&err);
    CHECK(mlu_pt_serialization_id(names, crcs, sizes, 7, id, &err) == MLU_OK);
    CHECK_STR(id, "0561108523619670529412909474344076269002");
    CHECK(mlu_pt_serialization_id(names, crcs, sizes, 0, id, &err) == MLU_OK);
    CHECK_STR(id, "0000000000000000000000000000000000000000");
    /* the CRC half is c10::hash_combine over the CRCs of non-empty records */
    CHECK(mlu_pt_hash_combine(0, 5) == 5 + 0x9e3779b9u);
    CHECK(mlu_pt_string_hash("", 0) != mlu_pt_string_hash("a", 1));
}

static void test_parallel_crc(void)
{
    size_t n = ((size_t)20 << 20) + 13, i;
    unsigned char *p = malloc(n);
    mlu_buf b = MLU_BUF_INIT;
    mlu_zipw w;
    mlu_error err;
    uint32_t x = 12345;

    CHECK(p != NULL);
    if (p == NULL)
        return;
    for (i = 0; i < n; i++) {
        x = x * 1103515245u + 12345u;
        p[i] = (unsigned char)(x >> 16);
    }
    mlu_error_clear(&err);
    CHECK(mlu_zipw_init(&w, "a", to_buf, &b, &err) == MLU_OK);
    CHECK(mlu_zipw_begin(&w, "big", n, &err) == MLU_OK);
    CHECK(mlu_zipw_payload(&w, p, n, &err) == MLU_OK);
    CHECK(mlu_zipw_end(&w, &err) == MLU_OK);
    CHECK(w.entries[0].crc == mlu_crc32(0, p, n));
    CHECK(b.len > n && memcmp(b.data + 64, p, n) == 0);
    /* after some bytes went through mlu_zipw_data it falls back to the serial path */
    CHECK(mlu_zipw_begin(&w, "big2", n, &err) == MLU_OK);
    CHECK(mlu_zipw_data(&w, p, 5, &err) == MLU_OK);
    CHECK(mlu_zipw_payload(&w, p + 5, n - 5, &err) == MLU_OK);
    CHECK(mlu_zipw_end(&w, &err) == MLU_OK);
    CHECK(w.entries[1].crc == mlu_crc32(0, p, n));
    mlu_zipw_free(&w);
    mlu_buf_free(&b);
    free(p);
}

int main(void)
{
    test_parallel_crc();
    test_serialization_id();
    test_ints();
    test_ops_and_memo();
    test_padding_and_crc();
    test_archive(MLU_ZIP64_LIMIT);
    test_archive(1);    /* every record zip64 (sizes and offsets) */
    test_archive(200);  /* offsets only after the first records, one big size */
    test_misuse_and_failures();
    return TEST_DONE("test_ptsave");
}
