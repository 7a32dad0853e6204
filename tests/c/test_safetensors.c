#define _GNU_SOURCE
/* Unit tests of the safetensors core: dtype table, parsing, writing, mappings. */
#include <stdlib.h>
#include <unistd.h>

#include "mlu_test.h"
#include "core/alloc.h"
#include "core/buf.h"
#include "core/safetensors.h"

/* A file from an 8-byte length, the header text padded to 8, then data. */
static uint8_t *make_file(const char *json, const void *data, size_t dlen, size_t *size)
{
    size_t n = strlen(json), padded = (n + 7) / 8 * 8, i;
    uint8_t *f = malloc(8 + padded + dlen + 1);
    for (i = 0; i < 8; i++)
        f[i] = (uint8_t)((uint64_t)padded >> (8 * i));
    memcpy(f + 8, json, n);
    memset(f + 8 + n, ' ', padded - n);
    if (dlen)
        memcpy(f + 8 + padded, data, dlen);
    *size = 8 + padded + dlen;
    return f;
}

static void test_dtypes(void)
{
    CHECK(MLU_ST_DTYPE_COUNT == 22);
    CHECK_STR(mlu_st_dtype_name(MLU_ST_F8_E4M3FNUZ), "F8_E4M3FNUZ");
    CHECK(mlu_st_dtype_from_name("BF16", 4) == MLU_ST_BF16);
    CHECK(mlu_st_dtype_from_name("BF1", 3) == -1);
    CHECK(mlu_st_dtype_bits(MLU_ST_F6_E3M2) == 6 && mlu_st_dtype_bits(MLU_ST_C64) == 64);
    CHECK(mlu_st_dtype_name(-1) == NULL && mlu_st_dtype_bits(99) == 0);
}

static void test_parse_valid(void)
{
    float data[6] = {1, 2, 3, 4, 5, 6};
    size_t size;
    uint8_t *f = make_file("{\"__metadata__\":{\"format\":\"pt\"},"
                           "\"b\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[8,24]},"
                           "\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                           "\"e\":{\"dtype\":\"F4\",\"shape\":[0],\"data_offsets\":[24,24]}}",
                           data, sizeof(data), &size);
    mlu_st_header h;
    mlu_error err;

    mlu_error_clear(&err);
    CHECK(mlu_st_parse(f, size, &h, &err) == MLU_OK);
    CHECK(h.ntensors == 3 && h.nmeta == 1 && h.has_metadata == 1);
    if (h.ntensors == 3) {
        CHECK_STR(h.tensors[0].name, "a");  /* offset order */
        CHECK_STR(h.tensors[1].name, "b");
        CHECK(h.tensors[1].ndim == 2 && h.tensors[1].shape[1] == 2);
        CHECK(h.tensors[2].dtype == MLU_ST_F4);
        CHECK_STR(h.meta[0].value, "pt");
    }
    CHECK(h.data_start % 8 == 0 && h.data_start + 24 == size);
    mlu_st_header_free(&h);
    free(f);
}

static void expect_error(const char *json, size_t dlen, const char *piece)
{
    static uint8_t zeros[64];
    size_t size;
    uint8_t *f = make_file(json, zeros, dlen, &size);
    mlu_st_header h;
    mlu_error err;

    mlu_error_clear(&err);
    CHECK(mlu_st_parse(f, size, &h, &err) == MLU_EFORMAT);
    CHECK(strstr(err.text, piece) != NULL);
    if (strstr(err.text, piece) == NULL)
        fprintf(stderr, "  got '%s', want '%s'\n", err.text, piece);
    CHECK(h.ntensors == 0 && h.tensors == NULL);
    free(f);
}

static void test_parse_invalid(void)
{
    mlu_st_header h;
    mlu_error err;
    uint8_t small[4] = {0};

    mlu_error_clear(&err);
    CHECK(mlu_st_parse(small, 4, &h, &err) == MLU_EFORMAT && strstr(err.text, "too small"));
    expect_error("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                 "\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}", 16, "duplicate");
    expect_error("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 9, "incomplete buffer");
    expect_error("{\"a\":{\"dtype\":\"F4\",\"shape\":[1],\"data_offsets\":[0,1]}}", 1, "misaligned slice");
    expect_error("{\"a\":{\"dtype\":\"X\",\"shape\":[1],\"data_offsets\":[0,1]}}", 1, "unknown dtype 'X'");
    expect_error("{\"__metadata__\":{\"a\":null}}", 0, "must be a string, found null");
}

static void test_write_format_example(void)
{
    uint64_t shape[3] = {1, 2, 3};
    float data[6] = {0};
    mlu_st_entry e = {"attn.0", 6, MLU_ST_F32, 3, shape, data, 24, 0};
    mlu_buf out = MLU_BUF_INIT;
    uint64_t dlen = 0;
    mlu_error err;
    const char *want = "{\"attn.0\":{\"dtype\":\"F32\",\"shape\":[1,2,3],\"data_offsets\":[0,24]}}";

    mlu_error_clear(&err);
    CHECK(mlu_st_build_header(&e, 1, NULL, 0, 0, &out, &dlen, &err) == MLU_OK);
    CHECK(out.len == 8 + 64 && dlen == 24 && (uint8_t)out.data[0] == 64);
    CHECK(memcmp(out.data + 8, want, 64) == 0);
    mlu_buf_free(&out);
}

static void test_write_order_and_metadata(void)
{
    uint64_t s1[1] = {2};
    uint8_t d[16] = {0};
    mlu_st_entry e[3] = {
        {"l.2", 3, MLU_ST_U8, 1, s1, d, 2, 0},
        {"l.10", 4, MLU_ST_U8, 1, s1, d, 2, 0},
        {"x", 1, MLU_ST_I64, 1, s1, d, 16, 0},
    };
    mlu_st_kv kv[2] = {{"z", 1, "1", 1}, {"a", 1, "\x01", 1}};
    mlu_buf out = MLU_BUF_INIT;
    uint64_t dlen = 0;
    mlu_error err;
    const char *want = "{\"__metadata__\":{\"a\":\"\\u0001\",\"z\":\"1\"},"
                       "\"x\":{\"dtype\":\"I64\",\"shape\":[2],\"data_offsets\":[0,16]},"
                       "\"l.10\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[16,18]},"
                       "\"l.2\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[18,20]}}";

    mlu_error_clear(&err);
    CHECK(mlu_st_build_header(e, 3, kv, 2, 1, &out, &dlen, &err) == MLU_OK);
    CHECK(dlen == 20 && (out.len - 8) % 8 == 0);
    CHECK(out.len >= 8 + strlen(want) && memcmp(out.data + 8, want, strlen(want)) == 0);
    mlu_buf_free(&out);

    {
        mlu_st_entry bad = {"__metadata__", 12, MLU_ST_U8, 1, s1, d, 2, 0};
        mlu_error_clear(&err);
        CHECK(mlu_st_build_header(&bad, 1, NULL, 0, 0, &out, &dlen, &err) == MLU_EINVAL);
        mlu_buf_free(&out);
    }
}

static void test_alloc_failures(void)
{
    float data[2] = {1, 2};
    size_t size;
    uint8_t *f = make_file("{\"__metadata__\":{\"k\":\"v\"},\"a\":{\"dtype\":\"F32\",\"shape\":[2],"
                           "\"data_offsets\":[0,8]}}", data, sizeof(data), &size);
    long n;
    int ok = 0, nomem = 0;

    for (n = 0; n < 50 && !ok; n++) {
        mlu_st_header h;
        mlu_error err;
        mlu_status st;
        mlu_error_clear(&err);
        mlu_alloc_fail_after(n);
        st = mlu_st_parse(f, size, &h, &err);
        mlu_alloc_fail_after(-1);
        if (st == MLU_OK) {
            ok = 1;
            mlu_st_header_free(&h);
        } else {
            CHECK(st == MLU_ENOMEM);
            nomem++;
        }
    }
    CHECK(ok && nomem >= 3);
    free(f);
}

static void test_map_file(void)
{
    char path[] = "/tmp/mlu_st_test_XXXXXX";
    int fd = mkstemp(path);
    uint8_t *base = NULL;
    size_t len = 0;
    mlu_error err;

    CHECK(fd >= 0);
    CHECK(write(fd, "abcdefgh", 8) == 8);
    close(fd);
    mlu_error_clear(&err);
    CHECK(mlu_st_map_file(path, &base, &len, &err) == MLU_OK && len == 8);
    if (base != NULL) {
        base[0] = 'z'; /* private: the file keeps its bytes */
        mlu_st_unmap(base, len);
    }
    mlu_error_clear(&err);
    CHECK(mlu_st_map_file(path, &base, &len, &err) == MLU_OK && base != NULL && base[0] == 'a');
    mlu_st_unmap(base, len);
    unlink(path);
    mlu_error_clear(&err);
    CHECK(mlu_st_map_file(path, &base, &len, &err) == MLU_EIO && err.sys_errno != 0);
}

int main(void)
{
    test_dtypes();
    test_parse_valid();
    test_parse_invalid();
    test_write_format_example();
    test_write_order_and_metadata();
    test_alloc_failures();
    test_map_file();
    return TEST_DONE("test_safetensors");
}
