#define _GNU_SOURCE
/* Unit tests of the safetensors core: dtype table, parsing, writing, mappings. */
#include <stdlib.h>
#include <unistd.h>

#include "mlu_test.h"
#include "core/alloc.h"
#include "core/buf.h"
#include "core/file.h"
#include "core/safetensors.h"
#include "core/torch_dtypes.h"

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

/* The safetensors table and the torch table's safetensors column state
 * different facts about the same dtypes: they must agree. */
static void test_dtype_table_and_torch_column_agree(void)
{
    int i, id, joined = 0;

    for (i = 0; i < MLU_ST_DTYPE_COUNT; i++) {
        const mlu_st_dtype_info *d = &mlu_st_dtypes[i];
        unsigned b = d->bits;
        CHECK(d->name != NULL);  /* every code has its row */
        if (d->name == NULL)
            continue;
        CHECK(mlu_st_dtype_from_name(d->name, strlen(d->name)) == i);  /* names unique */
        CHECK(b == 4 || b == 6 || b == 8 || b == 16 || b == 32 || b == 64);
        id = mlu_torch_dtype_of_safetensors(d->name);
        if (id < 0)
            continue;
        joined++;
        CHECK_STR(mlu_torch_dtypes[id].safetensors, d->name);
        /* whole elements: one torch item is one element; sub-byte types:
         * one torch item packs whole elements (F4: float4_e2m1fn_x2) */
        if (b % 8 == 0)
            CHECK(8u * mlu_torch_dtypes[id].itemsize == b);
        else
            CHECK((8u * mlu_torch_dtypes[id].itemsize) % b == 0);
    }
    /* every safetensors name of the torch table is a format dtype, named once */
    for (id = 0; id < MLU_TORCH_N_DTYPES; id++) {
        const char *st = mlu_torch_dtypes[id].safetensors;
        if (st == NULL)
            continue;
        CHECK(mlu_st_dtype_from_name(st, strlen(st)) >= 0);
        CHECK(mlu_torch_dtype_of_safetensors(st) == id);
        joined--;
    }
    CHECK(joined == 0);
    CHECK(mlu_torch_dtype_of_safetensors("F6_E2M3") == -1);
    CHECK(mlu_torch_dtype_of_safetensors("F4") == mlu_torch_dtype_named("float4_e2m1fn_x2"));
    CHECK(mlu_torch_dtype_of_safetensors("BF16") == mlu_torch_dtype_named("bfloat16"));
    CHECK(mlu_torch_dtype_of_safetensors("bfloat16") == -1);
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


/* Parses json (padded) + dlen zero bytes; returns the status, h filled on success. */
static mlu_status parse_json(const char *json, size_t dlen, mlu_st_header *h, mlu_error *err)
{
    static uint8_t zeros[64];
    size_t size;
    uint8_t *f = make_file(json, zeros, dlen, &size);
    mlu_status st;

    mlu_error_clear(err);
    st = mlu_st_parse(f, size, h, err);
    free(f);
    return st;
}

/* The reference's number grammar for shape and data_offsets (serde u64). */
static void test_parse_numbers(void)
{
    mlu_st_header h;
    mlu_error err;

    /* the whole u64 range, as the reference: a 0-element tensor may have any dimension */
    CHECK(parse_json("{\"a\":{\"dtype\":\"U8\",\"shape\":[0,18446744073709551615,9223372036854775808,"
                     "9223372036854775807],\"data_offsets\":[0,0]}}", 0, &h, &err) == MLU_OK);
    CHECK(h.ntensors == 1 && h.tensors[0].ndim == 4);
    if (h.ntensors == 1 && h.tensors[0].ndim == 4) {
        CHECK(h.tensors[0].shape[1] == UINT64_MAX);
        CHECK(h.tensors[0].shape[2] == (uint64_t)1 << 63);
        CHECK(h.tensors[0].shape[3] == (uint64_t)INT64_MAX);
    }
    mlu_st_header_free(&h);
    /* one past: a float to the reference */
    expect_error("{\"a\":{\"dtype\":\"U8\",\"shape\":[0,18446744073709551616],\"data_offsets\":[0,0]}}", 0,
                 "shape[1] must be a non-negative integer, found an integer above 2^64-1");
    expect_error("{\"a\":{\"dtype\":\"U8\",\"shape\":[0,99999999999999999999999],\"data_offsets\":[0,0]}}", 0,
                 "found an integer above 2^64-1");
    /* -0 is the float -0.0 to the reference */
    expect_error("{\"a\":{\"dtype\":\"U8\",\"shape\":[-0],\"data_offsets\":[0,0]}}", 0, "found a negative integer");
    expect_error("{\"a\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[-0,0]}}", 0, "negative integer as begin");
    expect_error("{\"a\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,-0]}}", 0, "negative integer as end");
    expect_error("{\"a\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,-00]}}", 0, "not valid JSON");
    expect_error("{\"a\":{\"dtype\":\"U8\",\"shape\":[01],\"data_offsets\":[0,1]}}", 1, "not valid JSON");
    expect_error("{\"a\":{\"dtype\":\"U8\",\"shape\":[+1],\"data_offsets\":[0,1]}}", 1, "not valid JSON");
    expect_error("{\"a\":{\"dtype\":\"U8\",\"shape\":[1e0],\"data_offsets\":[0,1]}}", 1, "found a real number");
    expect_error("{\"a\":{\"dtype\":\"U8\",\"shape\":[1.0],\"data_offsets\":[0,1]}}", 1, "found a real number");
    /* a negative number in the file can never stand for a rewritten big one */
    expect_error("{\"a\":{\"dtype\":\"U8\",\"shape\":[0,-2],\"data_offsets\":[0,0],"
                 "\"x\":18446744073709551615}}", 0, "shape[1] must be a non-negative integer, found a negative");
    /* in a field the reference ignores, any JSON number is fine */
    CHECK(parse_json("{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1],"
                     "\"x\":[-0,-7,18446744073709551616,18446744073709551615,1.5e3,\"-0\"]}}", 1, &h, &err) == MLU_OK);
    CHECK(h.ntensors == 1 && h.tensors[0].shape[0] == 1 && h.tensors[0].end == 1);
    mlu_st_header_free(&h);
    /* and the text of strings is never touched */
    CHECK(parse_json("{\"__metadata__\":{\"-0\":\"-0 18446744073709551616\"}}", 0, &h, &err) == MLU_OK);
    CHECK(h.nmeta == 1 && strcmp(h.meta[0].key, "-0") == 0 && strcmp(h.meta[0].value, "-0 18446744073709551616") == 0);
    mlu_st_header_free(&h);
}

static void test_parse_nesting_and_null_metadata(void)
{
    char json[1024];
    mlu_st_header h;
    mlu_error err;
    int depth;

    /* 2 levels (root, tensor) + 125 in an ignored field = 127: the most the reference reads */
    for (depth = 125; depth <= 126; depth++) {
        int k, n = snprintf(json, sizeof(json), "{\"a\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,0],\"x\":");
        for (k = 0; k < depth; k++)
            json[n++] = '[';
        for (k = 0; k < depth; k++)
            json[n++] = ']';
        json[n++] = '}';
        json[n++] = '}';
        json[n] = '\0';
        if (depth == 125) {
            CHECK(parse_json(json, 0, &h, &err) == MLU_OK);
            mlu_st_header_free(&h);
        } else {
            expect_error(json, 0, "deeper than 127 levels");
        }
    }
    /* null metadata is an absent one to the reference */
    CHECK(parse_json("{\"__metadata__\":null,\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}", 1,
                     &h, &err) == MLU_OK);
    CHECK(h.has_metadata == 0 && h.nmeta == 0 && h.ntensors == 1);
    mlu_st_header_free(&h);
}

/* The writer produces nothing its reader refuses: the same limits on both sides. */
static void test_write_limits_match_reader(void)
{
    uint64_t shape[2] = {0, INT64_MAX}, dims[MLU_ST_MAX_NDIM], nbytes = 1;
    uint8_t d[1] = {0};
    mlu_st_entry e = {"a", 1, MLU_ST_U8, 2, shape, d, 0, 0};
    mlu_buf out = MLU_BUF_INIT;
    uint64_t dlen = 0;
    mlu_st_header h;
    mlu_error err, rerr;
    unsigned elsize = 0;
    size_t nd = 0;

    /* the largest dimension an array can have: written, and read back as written */
    mlu_error_clear(&err);
    CHECK(mlu_st_build_header(&e, 1, NULL, 0, 0, &out, &dlen, &err) == MLU_OK);
    CHECK(mlu_st_parse((const uint8_t *)out.data, out.len, &h, &err) == MLU_OK);
    CHECK(h.ntensors == 1 && h.tensors[0].shape[1] == INT64_MAX);
    CHECK(mlu_st_array_shape(h.tensors[0].name, h.tensors[0].name_len, h.tensors[0].dtype, h.tensors[0].ndim,
                             h.tensors[0].shape, dims, &nd, &elsize, &nbytes, &err) == MLU_OK);
    CHECK(nd == 2 && dims[0] == 0 && dims[1] == INT64_MAX && elsize == 1 && nbytes == 0);
    mlu_st_header_free(&h);
    mlu_buf_free(&out);
    /* one more: the header can say it (the reference reads it), no array can hold it, so
     * the reader refuses to make one and the writer refuses to write it, in the same words */
    {
        static const char hdr[] = "{\"a\":{\"dtype\":\"U8\",\"shape\":[0,9223372036854775808],"
                                  "\"data_offsets\":[0,0]}}";
        uint8_t file[8 + sizeof(hdr) - 1];
        size_t k;
        for (k = 0; k < 8; k++)
            file[k] = (uint8_t)(((sizeof(hdr) - 1) >> (8 * k)) & 0xFF);
        memcpy(file + 8, hdr, sizeof(hdr) - 1);
        mlu_error_clear(&rerr);
        CHECK(mlu_st_parse(file, sizeof(file), &h, &rerr) == MLU_OK);
        CHECK(h.ntensors == 1 && h.tensors[0].shape[1] == (uint64_t)INT64_MAX + 1);
        CHECK(mlu_st_array_shape(h.tensors[0].name, h.tensors[0].name_len, h.tensors[0].dtype,
                                 h.tensors[0].ndim, h.tensors[0].shape, dims, &nd, &elsize, &nbytes,
                                 &rerr) == MLU_EINVAL);
        CHECK(strstr(rerr.text, "at most 2^63-1") != NULL);
        mlu_st_header_free(&h);
        shape[1] = (uint64_t)INT64_MAX + 1;
        mlu_error_clear(&err);
        CHECK(mlu_st_build_header(&e, 1, NULL, 0, 0, &out, &dlen, &err) == MLU_EINVAL);
        CHECK_STR(err.text, rerr.text);
        mlu_buf_free(&out);
        shape[1] = INT64_MAX;
    }
    /* a name holding NUL: the reader cannot take it back, so the writer refuses it */
    {
        mlu_st_entry nul = {"a\0b", 3, MLU_ST_U8, 2, shape, d, 0, 0};
        mlu_st_kv kv = {"k\0", 2, "v", 1};
        mlu_error_clear(&err);
        CHECK(mlu_st_build_header(&nul, 1, NULL, 0, 0, &out, &dlen, &err) == MLU_EINVAL);
        CHECK(strstr(err.text, "NUL") != NULL);
        mlu_buf_free(&out);
        mlu_error_clear(&err);
        CHECK(mlu_st_build_header(&e, 1, &kv, 1, 1, &out, &dlen, &err) == MLU_EINVAL);
        CHECK(strstr(err.text, "metadata key") != NULL);
        mlu_buf_free(&out);
    }
    /* total size: 8 + N + data must fit in 64 bits, as the reader computes it.  The
     * bytes are never read by mlu_st_build_header, only counted. */
    {
        uint64_t big = ((uint64_t)1 << 61) - 1, s[8][1], header_total = 0, rest = 1;
        mlu_st_entry many[8];
        int k, round;
        for (k = 0; k < 8; k++) {
            s[k][0] = big;
            many[k] = (mlu_st_entry){"t0", 2, MLU_ST_U8, 1, s[k], d, big, 0};
        }
        /* 7 of the largest tensors and one sized so the file is exactly 2^64-1 bytes */
        for (round = 0; round < 4; round++) {
            const char *names[8] = {"t0", "t1", "t2", "t3", "t4", "t5", "t6", "t7"};
            for (k = 0; k < 8; k++) {
                many[k].name = names[k];
                many[k].begin = 0;
            }
            if (round > 0)
                rest = UINT64_MAX - 7 * big - header_total;
            s[7][0] = rest;
            many[7].nbytes = rest;
            mlu_error_clear(&err);
            /* a failure here (the header grew) still leaves the header's size in out.len */
            if (mlu_st_build_header(many, 8, NULL, 0, 0, &out, &dlen, &err) == MLU_OK && round > 0 &&
                header_total == out.len)
                break;
            header_total = out.len; /* the header grew or shrank with the digits: again */
            mlu_buf_free(&out);
        }
        CHECK(header_total == out.len && (uint64_t)out.len + dlen == UINT64_MAX);
        mlu_buf_free(&out);
        /* one byte more: refused */
        for (k = 0; k < 8; k++)
            many[k].begin = 0;
        s[7][0] = rest + 1;
        for (k = 0; k < 8; k++)
            if (strcmp(many[k].name, "t7") == 0)
                many[k].nbytes = rest + 1, many[k].shape = s[7];
        mlu_error_clear(&err);
        CHECK(mlu_st_build_header(many, 8, NULL, 0, 0, &out, &dlen, &err) == MLU_EOVERFLOW);
        CHECK(strstr(err.text, "more than 2^64-1 bytes") != NULL);
        mlu_buf_free(&out);
    }
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

/* The header of a file, read with pread: valid, refused from its first 8
 * bytes, and cut by another writer after the open (an error, not SIGBUS). */
static void test_read_header(void)
{
    static const char json[] = "{\"a\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0,2]}}   ";
    char path[] = "/tmp/mlu_st_test_XXXXXX";
    uint8_t file[8 + sizeof(json) - 1 + 2];
    size_t n = sizeof(json) - 1, k;
    int fd = mkstemp(path), rfd = -1;
    uint64_t size = 0;
    mlu_st_header h;
    mlu_error err;

    CHECK(fd >= 0 && n % 8 == 0);
    for (k = 0; k < 8; k++)
        file[k] = (uint8_t)((uint64_t)n >> (8 * k));
    memcpy(file + 8, json, n);
    file[8 + n] = 1;
    file[9 + n] = 2;
    CHECK(write(fd, file, sizeof(file)) == (ssize_t)sizeof(file));
    close(fd);
    mlu_error_clear(&err);
    CHECK(mlu_file_open_ro(path, &rfd, &size, &err) == MLU_OK && size == sizeof(file));
    CHECK(mlu_st_read_header(rfd, size, &h, &err) == MLU_OK && h.ntensors == 1 && h.data_start == 8 + n);
    mlu_st_header_free(&h);
    /* as the parser says it: a file shorter than its header, or than 8 bytes */
    mlu_error_clear(&err);
    CHECK(mlu_st_read_header(rfd, 8 + n - 1, &h, &err) == MLU_EFORMAT && strstr(err.text, "invalid header length"));
    mlu_error_clear(&err);
    CHECK(mlu_st_read_header(rfd, 7, &h, &err) == MLU_EFORMAT && strstr(err.text, "header too small"));
    /* cut after the open: the size given is the one fstat saw then */
    CHECK(truncate(path, 20) == 0);
    mlu_error_clear(&err);
    CHECK(mlu_st_read_header(rfd, size, &h, &err) == MLU_EFORMAT && strstr(err.text, "file shrank while reading the header"));
    CHECK(truncate(path, 5) == 0);
    mlu_error_clear(&err);
    CHECK(mlu_st_read_header(rfd, size, &h, &err) == MLU_EFORMAT && strstr(err.text, "file shrank while reading the header length"));
    close(rfd);
    unlink(path);
}

int main(void)
{
    test_dtypes();
    test_dtype_table_and_torch_column_agree();
    test_parse_valid();
    test_parse_invalid();
    test_parse_numbers();
    test_parse_nesting_and_null_metadata();
    test_write_limits_match_reader();
    test_write_format_example();
    test_write_order_and_metadata();
    test_alloc_failures();
    test_read_header();
    return TEST_DONE("test_safetensors");
}
