/* safetensors.c: header validation, byte-identical header writing, reading a header from a file. */
#define _GNU_SOURCE
#include "safetensors.h"
#include "alloc.h"
#include "atomicfile.h"
#include "bytes.h"
#include "file.h"
#include "json.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* ------------------------------------------------------------------ dtypes */

const mlu_st_dtype_info mlu_st_dtypes[MLU_ST_DTYPE_COUNT] = {
    [MLU_ST_BOOL] = {"BOOL", 8},
    [MLU_ST_F4] = {"F4", 4},
    [MLU_ST_F6_E2M3] = {"F6_E2M3", 6},
    [MLU_ST_F6_E3M2] = {"F6_E3M2", 6},
    [MLU_ST_U8] = {"U8", 8},
    [MLU_ST_I8] = {"I8", 8},
    [MLU_ST_F8_E5M2] = {"F8_E5M2", 8},
    [MLU_ST_F8_E4M3] = {"F8_E4M3", 8},
    [MLU_ST_F8_E8M0] = {"F8_E8M0", 8},
    [MLU_ST_F8_E4M3FNUZ] = {"F8_E4M3FNUZ", 8},
    [MLU_ST_F8_E5M2FNUZ] = {"F8_E5M2FNUZ", 8},
    [MLU_ST_I16] = {"I16", 16},
    [MLU_ST_U16] = {"U16", 16},
    [MLU_ST_F16] = {"F16", 16},
    [MLU_ST_BF16] = {"BF16", 16},
    [MLU_ST_I32] = {"I32", 32},
    [MLU_ST_U32] = {"U32", 32},
    [MLU_ST_F32] = {"F32", 32},
    [MLU_ST_C64] = {"C64", 64},
    [MLU_ST_F64] = {"F64", 64},
    [MLU_ST_I64] = {"I64", 64},
    [MLU_ST_U64] = {"U64", 64},
};

const char *mlu_st_dtype_name(int dtype)
{
    if (dtype < 0 || dtype >= MLU_ST_DTYPE_COUNT)
        return NULL;
    return mlu_st_dtypes[dtype].name;
}

int mlu_st_dtype_from_name(const char *name, size_t n)
{
    int i;

    for (i = 0; i < MLU_ST_DTYPE_COUNT; i++) {
        if (strlen(mlu_st_dtypes[i].name) == n && memcmp(mlu_st_dtypes[i].name, name, n) == 0)
            return i;
    }
    return -1;
}

unsigned mlu_st_dtype_bits(int dtype)
{
    if (dtype < 0 || dtype >= MLU_ST_DTYPE_COUNT)
        return 0;
    return mlu_st_dtypes[dtype].bits;
}

/* ------------------------------------------------------------------ helpers */

/* Names go into messages shortened, so a hostile name cannot drown the text. */
#define NAME_SHOWN 64
#define SHOW(p, n) (int)((n) > NAME_SHOWN ? NAME_SHOWN : (n)), (p)
#define ELLIPSIS(n) ((n) > NAME_SHOWN ? "..." : "")

static char *dup_bytes(const char *s, size_t n)
{
    char *p = NULL;

    if (n == SIZE_MAX)
        return NULL;
    p = mlu_malloc(n + 1);
    if (p != NULL) {
        memcpy(p, s, n);
        p[n] = '\0';
    }
    return p;
}

static const char *json_kind(const json_t *v)
{
    switch (json_typeof(v)) {
    case JSON_OBJECT: return "an object";
    case JSON_ARRAY: return "an array";
    case JSON_STRING: return "a string";
    case JSON_INTEGER: return "an integer";
    case JSON_REAL: return "a real number";
    case JSON_TRUE:
    case JSON_FALSE: return "a boolean";
    case JSON_NULL: return "null";
    default: return "a value";
    }
}

void mlu_st_header_free(mlu_st_header *h)
{
    size_t i;

    for (i = 0; i < h->ntensors; i++) {
        mlu_free(h->tensors[i].name);
        mlu_free(h->tensors[i].shape);
    }
    for (i = 0; i < h->nmeta; i++) {
        mlu_free(h->meta[i].key);
        mlu_free(h->meta[i].value);
    }
    mlu_free(h->tensors);
    mlu_free(h->meta);
    memset(h, 0, sizeof(*h));
}

/* ------------------------------------------------------------------ parsing */

static mlu_status parse_metadata(json_t *obj, mlu_st_header *h, mlu_error *err)
{
    mlu_status st = MLU_OK;
    const char *key;
    size_t klen;
    json_t *val;

    if (json_is_null(obj))
        return MLU_OK;  /* the reference reads it as an absent __metadata__ (an Option) */
    if (!json_is_object(obj))
        return mlu_error_set(err, MLU_EFORMAT, -1,
                             "__metadata__ must be an object of strings, found %s", json_kind(obj));
    h->has_metadata = 1;
    if (json_object_size(obj) == 0)
        return MLU_OK;
    h->meta = mlu_calloc(json_object_size(obj), sizeof(mlu_st_meta));
    if (h->meta == NULL)
        return mlu_error_set(err, MLU_ENOMEM, -1, "out of memory reading __metadata__");
    json_object_keylen_foreach(obj, key, klen, val) {
        mlu_st_meta *m = &h->meta[h->nmeta];
        if (!json_is_string(val)) {
            st = mlu_error_set(err, MLU_EFORMAT, -1,
                               "__metadata__ value of key '%.*s%s' must be a string, found %s",
                               SHOW(key, klen), ELLIPSIS(klen), json_kind(val));
            break;
        }
        m->key = dup_bytes(key, klen);
        m->value = dup_bytes(json_string_value(val), json_string_length(val));
        h->nmeta++;
        if (m->key == NULL || m->value == NULL) {
            st = mlu_error_set(err, MLU_ENOMEM, -1, "out of memory reading __metadata__");
            break;
        }
        m->key_len = klen;
        m->value_len = json_string_length(val);
    }
    return st;
}

/* ------------------------------------------------------------------ numbers
 *
 * The reference parses the header with serde_json and reads shape and
 * data_offsets as u64: an integer token is an unsigned integer when it fits
 * in 64 bits, while "-0" and any integer beyond 2^64-1 are floats (so wrong
 * there, but fine in an ignored field).  jansson's integers are int64 and
 * "-0" is 0 to it.  So before jansson sees the header, a same-length copy is
 * made in which, outside strings:
 *   - every negative integer token (including "-0") becomes "-1" plus spaces;
 *   - every integer token above INT64_MAX becomes "-k" plus spaces, k >= 2,
 *     where big[k - 2] keeps its value (or that it exceeds 2^64-1).
 * Tokens that are not JSON integers (reals, "01", "+1") are left for jansson
 * to read or reject.  Offsets in the text are unchanged, so jansson's error
 * positions still speak of the file.  The same pass enforces the reference's
 * nesting limit. */

/* serde_json's recursion limit: the reference rejects a header whose arrays
 * and objects nest deeper than this (checked against safetensors 0.8). */
#define MAX_NESTING 127

typedef struct big_int {
    uint64_t value;
    int too_big;      /* the token is above 2^64-1: serde reads it as a float */
} big_int;

typedef struct numbers {
    big_int *big;     /* owned */
    size_t nbig;
    size_t cap;
} numbers;

static int is_digit(uint8_t c)
{
    return c >= '0' && c <= '9';
}

static int is_number_char(uint8_t c)
{
    return is_digit(c) || c == '-' || c == '+' || c == '.' || c == 'e' || c == 'E';
}

static int is_word_char(uint8_t c)
{
    return is_number_char(c) || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
}

/* Writes "-k" at p and pads the token's other bytes with spaces. */
static void put_marker(uint8_t *p, size_t len, uint64_t k)
{
    char tmp[24];
    int w = snprintf(tmp, sizeof(tmp), "-%" PRIu64, k);
    size_t i;

    for (i = 0; i < len; i++)
        p[i] = i < (size_t)w ? (uint8_t)tmp[i] : ' ';
}

/* Scans the n header bytes at `text`.  When a token needs rewriting, *copy
 * receives a rewritten copy (owned, mlu_free) and nums the big values. */
static mlu_status scan_numbers(const uint8_t *text, size_t n, uint8_t **copy, numbers *nums,
                               mlu_error *err)
{
    mlu_status st = MLU_OK;
    size_t i = 0, depth = 0;

    *copy = NULL;
    while (i < n) {
        uint8_t c = text[i];
        if (c == '"') {
            i++;
            while (i < n && text[i] != '"')
                i += text[i] == '\\' ? 2 : 1;
            i++;
            continue;
        }
        if (c == '[' || c == '{') {
            if (++depth > MAX_NESTING) {
                st = mlu_error_set(err, MLU_EFORMAT, (int64_t)(8 + i),
                                   "header nests arrays and objects deeper than %d levels "
                                   "(byte offset %" PRIu64 "), the reference's limit",
                                   MAX_NESTING, (uint64_t)(8 + i));
                goto error;
            }
        } else if ((c == ']' || c == '}') && depth > 0) {
            depth--;
        }
        if ((c == '-' || is_digit(c)) && (i == 0 || !is_word_char(text[i - 1]))) {
            size_t start = i, end = i, digits;
            int neg = c == '-', integer;
            uint64_t v = 0;
            int over = 0;
            if (neg)
                end++;
            while (end < n && is_digit(text[end]))
                end++;
            digits = end - start - (size_t)neg;
            /* a JSON integer: -?(0|[1-9][0-9]*), not followed by more of a number */
            integer = digits > 0 && !(digits > 1 && text[start + neg] == '0') &&
                      (end == n || !is_number_char(text[end]));
            if (!integer) {
                while (end < n && is_number_char(text[end]))
                    end++;
                i = end;
                continue;
            }
            if (!neg) {
                size_t k;
                for (k = start; k < end && !over; k++)
                    over = mlu_mul_overflow_u64(v, 10, &v) ||
                           mlu_add_overflow_u64(v, (uint64_t)(text[k] - '0'), &v);
            }
            if (neg || over || v > (uint64_t)INT64_MAX) {
                if (*copy == NULL) {
                    *copy = mlu_malloc(n);
                    if (*copy == NULL) {
                        st = mlu_error_set(err, MLU_ENOMEM, -1, "out of memory reading the header");
                        goto error;
                    }
                    memcpy(*copy, text, n);
                }
                if (neg) {
                    put_marker(*copy + start, end - start, 1);
                } else {
                    if (nums->nbig == nums->cap &&
                        (st = mlu_grow((void **)&nums->big, &nums->cap, nums->nbig + 1, sizeof(big_int),
                                       SIZE_MAX, "the header's large numbers", err)) != MLU_OK)
                        goto error;
                    nums->big[nums->nbig].value = v;
                    nums->big[nums->nbig].too_big = over;
                    /* 19+ digits always hold "-k" for the k < 10^17 a header can reach */
                    put_marker(*copy + start, end - start, (uint64_t)nums->nbig + 2);
                    nums->nbig++;
                }
            }
            i = end;
            continue;
        }
        i++;
    }
    goto done;
error:
    mlu_free(*copy);
    *copy = NULL;
done:
    return st;
}

/* What get_uint found. */
enum { UINT_OK, UINT_NOT_INTEGER, UINT_NEGATIVE, UINT_TOO_BIG };

/* A JSON value that must be an unsigned 64-bit integer (serde's u64/usize). */
static int get_uint(const json_t *v, const numbers *nums, uint64_t *out)
{
    json_int_t i;

    if (!json_is_integer(v))
        return UINT_NOT_INTEGER;
    i = json_integer_value(v);
    if (i >= 0) {
        *out = (uint64_t)i;
        return UINT_OK;
    }
    if (i == -1 || (uint64_t)(-(i + 2)) >= nums->nbig)
        return UINT_NEGATIVE;
    if (nums->big[-(i + 2)].too_big)
        return UINT_TOO_BIG;
    *out = nums->big[-(i + 2)].value;
    return UINT_OK;
}

static const char *uint_problem(int why, const json_t *v)
{
    switch (why) {
    case UINT_NEGATIVE: return "a negative integer";
    case UINT_TOO_BIG: return "an integer above 2^64-1";
    default: return json_kind(v);
    }
}

static mlu_status parse_tensor(const char *name, size_t nlen, json_t *obj, const numbers *nums,
                               mlu_st_tensor *t, mlu_error *err)
{
    mlu_status st = MLU_EFORMAT;
    json_t *dtype, *shape, *offs;
    size_t i;
    int why;

    if (!json_is_object(obj)) {
        st = mlu_error_set(err, MLU_EFORMAT, -1,
                           "tensor '%.*s%s': entry must be an object, found %s",
                           SHOW(name, nlen), ELLIPSIS(nlen), json_kind(obj));
        goto error;
    }
    dtype = json_object_get(obj, "dtype");
    shape = json_object_get(obj, "shape");
    offs = json_object_get(obj, "data_offsets");
    if (dtype == NULL || shape == NULL || offs == NULL) {
        st = mlu_error_set(err, MLU_EFORMAT, -1, "tensor '%.*s%s': missing field '%s'",
                           SHOW(name, nlen), ELLIPSIS(nlen),
                           dtype == NULL ? "dtype" : shape == NULL ? "shape" : "data_offsets");
        goto error;
    }
    if (!json_is_string(dtype)) {
        st = mlu_error_set(err, MLU_EFORMAT, -1, "tensor '%.*s%s': dtype must be a string, found %s",
                           SHOW(name, nlen), ELLIPSIS(nlen), json_kind(dtype));
        goto error;
    }
    t->dtype = mlu_st_dtype_from_name(json_string_value(dtype), json_string_length(dtype));
    if (t->dtype < 0) {
        size_t dl = json_string_length(dtype);
        st = mlu_error_set(err, MLU_EFORMAT, -1, "tensor '%.*s%s': unknown dtype '%.*s%s'",
                           SHOW(name, nlen), ELLIPSIS(nlen), SHOW(json_string_value(dtype), dl),
                           ELLIPSIS(dl));
        goto error;
    }
    if (!json_is_array(shape)) {
        st = mlu_error_set(err, MLU_EFORMAT, -1,
                           "tensor '%.*s%s': shape must be an array of non-negative integers, found %s",
                           SHOW(name, nlen), ELLIPSIS(nlen), json_kind(shape));
        goto error;
    }
    t->ndim = json_array_size(shape);
    if (t->ndim > 0) {
        t->shape = mlu_calloc(t->ndim, sizeof(uint64_t));
        if (t->shape == NULL) {
            st = mlu_error_set(err, MLU_ENOMEM, -1, "out of memory reading the header");
            goto error;
        }
    }
    for (i = 0; i < t->ndim; i++) {
        json_t *d = json_array_get(shape, i);
        if ((why = get_uint(d, nums, &t->shape[i])) != UINT_OK) {
            st = mlu_error_set(err, MLU_EFORMAT, -1,
                               "tensor '%.*s%s': shape[%zu] must be a non-negative integer, found %s",
                               SHOW(name, nlen), ELLIPSIS(nlen), i, uint_problem(why, d));
            goto error;
        }
    }
    if (!json_is_array(offs) || json_array_size(offs) != 2) {
        st = mlu_error_set(err, MLU_EFORMAT, -1,
                           "tensor '%.*s%s': data_offsets must be [begin, end] with non-negative integers",
                           SHOW(name, nlen), ELLIPSIS(nlen));
        goto error;
    }
    for (i = 0; i < 2; i++) {
        json_t *o = json_array_get(offs, i);
        if ((why = get_uint(o, nums, i == 0 ? &t->begin : &t->end)) != UINT_OK) {
            st = mlu_error_set(err, MLU_EFORMAT, -1,
                               "tensor '%.*s%s': data_offsets must be [begin, end] with non-negative "
                               "integers, found %s as %s",
                               SHOW(name, nlen), ELLIPSIS(nlen), uint_problem(why, o),
                               i == 0 ? "begin" : "end");
            goto error;
        }
    }
    t->name = dup_bytes(name, nlen);
    if (t->name == NULL) {
        st = mlu_error_set(err, MLU_ENOMEM, -1, "out of memory reading the header");
        goto error;
    }
    t->name_len = nlen;
    st = MLU_OK;
error:
    return st;
}

static int name_cmp(const char *a, size_t an, const char *b, size_t bn)
{
    int c = memcmp(a, b, an < bn ? an : bn);
    if (c != 0)
        return c;
    return an < bn ? -1 : an > bn ? 1 : 0;
}

static int tensor_offset_cmp(const void *pa, const void *pb)
{
    const mlu_st_tensor *a = pa, *b = pb;

    if (a->begin != b->begin)
        return a->begin < b->begin ? -1 : 1;
    if (a->end != b->end)
        return a->end < b->end ? -1 : 1;
    return name_cmp(a->name, a->name_len, b->name, b->name_len);
}

/* The bit size of a tensor of `shape` and `dtype` (a valid code) in *nbits,
 * with the header rules' words for what is refused: an element count or
 * bit size beyond 64 bits, a size that is not whole bytes.  code: the
 * status of a refusal (MLU_EFORMAT reading, MLU_EINVAL writing). */
static mlu_status shape_bits(const char *name, size_t name_len, int dtype, size_t ndim,
                             const uint64_t *shape, mlu_status code, uint64_t *nbits, mlu_error *err)
{
    mlu_status st = code;
    uint64_t nelem = 1;
    size_t k;

    for (k = 0; k < ndim; k++) {
        if (mlu_mul_overflow_u64(nelem, shape[k], &nelem)) {
            mlu_error_set(err, code, -1, "tensor '%.*s%s': the element count of its shape overflows 64 bits",
                          SHOW(name, name_len), ELLIPSIS(name_len));
            goto done;
        }
    }
    if (mlu_mul_overflow_u64(nelem, mlu_st_dtype_bits(dtype), nbits)) {
        mlu_error_set(err, code, -1, "tensor '%.*s%s': the bit size of its shape overflows 64 bits",
                      SHOW(name, name_len), ELLIPSIS(name_len));
        goto done;
    }
    if (*nbits % 8 != 0) {
        mlu_error_set(err, code, -1,
                      "tensor '%.*s%s': misaligned slice: %" PRIu64 " elements of %s are %" PRIu64
                      " bits, not a whole number of bytes",
                      SHOW(name, name_len), ELLIPSIS(name_len), nelem, mlu_st_dtypes[dtype].name, *nbits);
        goto done;
    }
    st = MLU_OK;
done:
    return st;
}

/* The offset rules, in the reference's order, over tensors sorted by offset. */
static mlu_status check_layout(mlu_st_header *h, uint64_t size, mlu_error *err)
{
    uint64_t prev_end = 0, total;
    mlu_status st;
    size_t i;

    for (i = 0; i < h->ntensors; i++) {
        const mlu_st_tensor *t = &h->tensors[i];
        uint64_t nbits;
        if (t->begin == prev_end && t->end < t->begin)
            return mlu_error_set(err, MLU_EFORMAT, (int64_t)h->data_start,
                                 "tensor '%.*s%s': invalid data_offsets [%" PRIu64 ", %" PRIu64
                                 "]: the end comes before the beginning",
                                 SHOW(t->name, t->name_len), ELLIPSIS(t->name_len), t->begin,
                                 t->end);
        if (t->begin != prev_end)
            return mlu_error_set(err, MLU_EFORMAT, (int64_t)h->data_start,
                                 "tensor '%.*s%s': invalid data_offsets [%" PRIu64 ", %" PRIu64
                                 "]: expected it to begin at %" PRIu64
                                 " (tensors must be contiguous from 0, without gaps or overlaps)",
                                 SHOW(t->name, t->name_len), ELLIPSIS(t->name_len), t->begin,
                                 t->end, prev_end);
        if ((st = shape_bits(t->name, t->name_len, t->dtype, t->ndim, t->shape, MLU_EFORMAT, &nbits,
                             err)) != MLU_OK)
            return st;
        if (t->end - t->begin != nbits / 8)
            return mlu_error_set(err, MLU_EFORMAT, (int64_t)(h->data_start + t->begin),
                                 "tensor '%.*s%s': shape and dtype %s need %" PRIu64
                                 " bytes but data_offsets [%" PRIu64 ", %" PRIu64 "] hold %" PRIu64,
                                 SHOW(t->name, t->name_len), ELLIPSIS(t->name_len),
                                 mlu_st_dtypes[t->dtype].name, nbits / 8, t->begin, t->end,
                                 t->end - t->begin);
        prev_end = t->end;
    }
    if (mlu_add_overflow_u64(prev_end, h->data_start, &total) || total != size)
        return mlu_error_set(err, MLU_EFORMAT, (int64_t)h->data_start,
                             "incomplete buffer: the tensors' data ends at byte %" PRIu64
                             " of the buffer (file offset %" PRIu64 ") but the file has %" PRIu64
                             " bytes: every byte after the header must belong to exactly one tensor",
                             prev_end, h->data_start + prev_end, size);
    return MLU_OK;
}

mlu_status mlu_st_parse(const uint8_t *data, uint64_t size, mlu_st_header *h, mlu_error *err)
{
    mlu_status st = MLU_EFORMAT;
    mlu_json_doc doc = {NULL, 0};
    numbers nums = {NULL, 0, 0};
    uint8_t *copy = NULL;        /* the header with numbers rewritten, when it had to be */
    uint64_t n = 0;
    size_t bad, cap;
    const char *key;
    size_t klen;
    json_t *val;

    memset(h, 0, sizeof(*h));
    if (size < 8) {
        st = mlu_error_set(err, MLU_EFORMAT, 0,
                           "header too small: the file has %" PRIu64
                           " bytes, a safetensors file starts with an 8-byte header length",
                           size);
        goto error;
    }
    n = mlu_le64(data);
    if (n > MLU_ST_MAX_HEADER) {
        st = mlu_error_set(err, MLU_EFORMAT, 0,
                           "header too large: it declares %" PRIu64 " bytes, the limit is %u", n,
                           MLU_ST_MAX_HEADER);
        goto error;
    }
    if (8 + n > size) {
        st = mlu_error_set(err, MLU_EFORMAT, 0,
                           "invalid header length: it declares %" PRIu64
                           " bytes but only %" PRIu64 " follow the 8-byte length",
                           n, size - 8);
        goto error;
    }
    h->header_len = n;
    h->data_start = 8 + n;
    bad = mlu_utf8_invalid_at(data + 8, (size_t)n, 0);
    if (bad != (size_t)n) {
        st = mlu_error_set(err, MLU_EFORMAT, (int64_t)(8 + bad),
                           "header is not valid UTF-8 (byte offset %" PRIu64 ")",
                           (uint64_t)(8 + bad));
        goto error;
    }
    if ((st = scan_numbers(data + 8, (size_t)n, &copy, &nums, err)) != MLU_OK)
        goto error;
    if ((st = mlu_json_parse(copy != NULL ? (const char *)copy : (const char *)data + 8, (size_t)n, 0,
                             &doc, err)) != MLU_OK) {
        if (err != NULL && st == MLU_EFORMAT) {
            /* Make the message and offset speak of the file. */
            char why[200];
            int64_t off = err->offset >= 0 ? err->offset + 8 : 8;
            memcpy(why, err->text, sizeof(why) - 1);
            why[sizeof(why) - 1] = '\0';
            snprintf(err->text, sizeof(err->text),
                     "header is not valid JSON at byte offset %" PRId64 " (line %d, column %d): %.200s",
                     off, err->line, err->column, why);
            err->offset = off;
        }
        goto error;
    }
    if (!json_is_object(doc.root)) {
        st = mlu_error_set(err, MLU_EFORMAT, 8, "header must be a JSON object, found %s",
                           json_kind(doc.root));
        goto error;
    }
    cap = json_object_size(doc.root);
    if (cap > 0) {
        h->tensors = mlu_calloc(cap, sizeof(mlu_st_tensor));
        if (h->tensors == NULL) {
            st = mlu_error_set(err, MLU_ENOMEM, -1, "out of memory reading the header");
            goto error;
        }
    }
    st = MLU_OK;
    json_object_keylen_foreach(doc.root, key, klen, val) {
        if (klen == 12 && memcmp(key, "__metadata__", 12) == 0) {
            st = parse_metadata(val, h, err);
        } else {
            st = parse_tensor(key, klen, val, &nums, &h->tensors[h->ntensors], err);
            if (st == MLU_OK) {
                h->ntensors++;
            } else {
                mlu_free(h->tensors[h->ntensors].shape);
                h->tensors[h->ntensors].shape = NULL;
            }
        }
        if (st != MLU_OK)
            goto error;
    }
    if (h->ntensors > 1)
        qsort(h->tensors, h->ntensors, sizeof(mlu_st_tensor), tensor_offset_cmp);
    if ((st = check_layout(h, size, err)) != MLU_OK)
        goto error;
    st = MLU_OK;
    goto done;
error:
    mlu_st_header_free(h);
done:
    mlu_json_doc_free(&doc);
    mlu_free(copy);
    mlu_free(nums.big);
    return st;
}

/* ------------------------------------------------------------------ arrays */

mlu_status mlu_st_array_shape(const char *name, size_t name_len, int dtype, size_t ndim,
                              const uint64_t *shape, uint64_t dims[MLU_ST_MAX_NDIM], size_t *nd,
                              unsigned *elsize, uint64_t *nbytes, mlu_error *err)
{
    mlu_status st = MLU_EINVAL;
    unsigned bits = mlu_st_dtype_bits(dtype);
    uint64_t nbits = 0, size, last;
    size_t k;

    *nd = 0;
    if (bits == 0) {
        mlu_error_set(err, MLU_EINVAL, -1, "tensor '%.*s%s': invalid dtype code %d", SHOW(name, name_len),
                      ELLIPSIS(name_len), dtype);
        goto done;
    }
    if ((st = shape_bits(name, name_len, dtype, ndim, shape, MLU_EINVAL, &nbits, err)) != MLU_OK)
        goto done;
    st = MLU_EINVAL;
    if (ndim > MLU_ST_MAX_NDIM) {
        mlu_error_set(err, MLU_EINVAL, -1, "tensor '%.*s%s' has %zu dimensions, NumPy allows %d",
                      SHOW(name, name_len), ELLIPSIS(name_len), ndim, MLU_ST_MAX_NDIM);
        goto done;
    }
    for (k = 0; k < ndim; k++) {
        if (shape[k] > (uint64_t)INT64_MAX) {
            mlu_error_set(err, MLU_EINVAL, -1,
                          "tensor '%.*s%s': dimension %zu is %" PRIu64 ", NumPy and torch allow at most 2^63-1",
                          SHOW(name, name_len), ELLIPSIS(name_len), k, shape[k]);
            goto done;
        }
        dims[k] = shape[k];
    }
    *nd = ndim;
    *elsize = bits / 8;
    if (bits % 8 != 0) {
        /* bytes: the last dimension scaled when whole (d x bits split as
         * 8q x bits + r x bits, so nothing wraps at 2^64), else all of them */
        *elsize = 1;
        last = ndim > 0 ? dims[ndim - 1] : 1;
        if (ndim > 0 && (last % 8) * bits % 8 == 0) {
            dims[ndim - 1] = last / 8 * bits + last % 8 * bits / 8;
        } else {
            *nd = 1;
            dims[0] = nbits / 8;
        }
    }
    /* NumPy's own rule: item size x the non-zero dimensions fits in 2^63-1 */
    size = *elsize;
    for (k = 0; k < *nd; k++) {
        if (dims[k] != 0 && (mlu_mul_overflow_u64(size, dims[k], &size) || size > (uint64_t)INT64_MAX)) {
            mlu_error_set(err, MLU_EINVAL, -1,
                          "tensor '%.*s%s': its %s array would span more than 2^63-1 bytes counting its "
                          "non-zero dimensions, NumPy's limit",
                          SHOW(name, name_len), ELLIPSIS(name_len), mlu_st_dtypes[dtype].name);
            goto done;
        }
    }
    *nbytes = nbits / 8;
    st = MLU_OK;
done:
    return st;
}

/* ------------------------------------------------------------------ writing */

static int entry_order_cmp(const void *pa, const void *pb)
{
    const mlu_st_entry *a = pa, *b = pb;

    if (a->dtype != b->dtype)
        return a->dtype > b->dtype ? -1 : 1;
    return name_cmp(a->name, a->name_len, b->name, b->name_len);
}

static int kv_cmp(const void *pa, const void *pb)
{
    const mlu_st_kv *a = pa, *b = pb;

    return name_cmp(a->key, a->key_len, b->key, b->key_len);
}

static mlu_status put_u64(mlu_buf *b, uint64_t v, mlu_error *err)
{
    char tmp[24];
    int w = snprintf(tmp, sizeof(tmp), "%" PRIu64, v);

    return mlu_buf_append(b, tmp, (size_t)w, err);
}

static mlu_status check_entry(const mlu_st_entry *e, mlu_error *err)
{
    mlu_status st = MLU_EINVAL;
    uint64_t dims[MLU_ST_MAX_NDIM], nbytes = 0;
    unsigned elsize;
    size_t nd;

    if (mlu_st_dtype_bits(e->dtype) == 0) {
        mlu_error_set(err, MLU_EINVAL, -1, "tensor '%.*s%s': invalid dtype code %d",
                      SHOW(e->name, e->name_len), ELLIPSIS(e->name_len), e->dtype);
        goto done;
    }
    if (e->name_len > 0 && memchr(e->name, '\0', e->name_len) != NULL) {
        mlu_error_set(err, MLU_EINVAL, -1,
                      "tensor '%.*s%s': a name holding a NUL character cannot be read back "
                      "(JSON object keys here cannot hold \\u0000)",
                      SHOW(e->name, e->name_len), ELLIPSIS(e->name_len));
        goto done;
    }
    if (e->name_len == 12 && memcmp(e->name, "__metadata__", 12) == 0) {
        mlu_error_set(err, MLU_EINVAL, -1,
                      "'__metadata__' is reserved for the header's metadata and cannot name a tensor");
        goto done;
    }
    /* what the reader refuses, refused in its words */
    if ((st = mlu_st_array_shape(e->name, e->name_len, e->dtype, e->ndim, e->shape, dims, &nd, &elsize,
                                 &nbytes, err)) != MLU_OK)
        goto done;
    st = MLU_EINVAL;
    if (nbytes != e->nbytes) {
        mlu_error_set(err, MLU_EINVAL, -1,
                      "tensor '%.*s%s': shape and dtype %s need %" PRIu64 " bytes but the data has %" PRIu64,
                      SHOW(e->name, e->name_len), ELLIPSIS(e->name_len), mlu_st_dtypes[e->dtype].name, nbytes,
                      e->nbytes);
        goto done;
    }
    st = MLU_OK;
done:
    return st;
}

mlu_status mlu_st_build_header(mlu_st_entry *entries, size_t n, mlu_st_kv *meta, size_t nmeta,
                               int has_metadata, mlu_buf *out, uint64_t *data_len,
                               mlu_error *err)
{
    mlu_status st = MLU_OK;
    uint64_t off = 0, json_len, total;
    size_t i, k, start;
    int first = 1;

    *data_len = 0;
    for (i = 0; i < n && st == MLU_OK; i++)
        st = check_entry(&entries[i], err);
    if (st != MLU_OK)
        goto error;
    if (n > 1)
        qsort(entries, n, sizeof(mlu_st_entry), entry_order_cmp);
    start = out->len;
    /* The length is patched in once known. */
    if ((st = mlu_buf_append(out, "\0\0\0\0\0\0\0\0{", 9, err)) != MLU_OK)
        goto error;
    for (k = 0; k < nmeta && has_metadata; k++) {
        if (meta[k].key_len > 0 && memchr(meta[k].key, '\0', meta[k].key_len) != NULL) {
            st = mlu_error_set(err, MLU_EINVAL, -1,
                               "metadata key '%.*s%s': a key holding a NUL character cannot be read "
                               "back (JSON object keys here cannot hold \\u0000)",
                               SHOW(meta[k].key, meta[k].key_len), ELLIPSIS(meta[k].key_len));
            goto error;
        }
    }
    if (has_metadata) {
        if (nmeta > 1)
            qsort(meta, nmeta, sizeof(mlu_st_kv), kv_cmp);
        if ((st = mlu_buf_puts(out, "\"__metadata__\":{", err)) != MLU_OK)
            goto error;
        for (k = 0; k < nmeta; k++) {
            if ((k > 0 && (st = mlu_buf_putc(out, ',', err)) != MLU_OK) ||
                (st = mlu_json_put_string(out, meta[k].key, meta[k].key_len, err)) != MLU_OK ||
                (st = mlu_buf_putc(out, ':', err)) != MLU_OK ||
                (st = mlu_json_put_string(out, meta[k].value, meta[k].value_len, err)) != MLU_OK)
                goto error;
        }
        if ((st = mlu_buf_putc(out, '}', err)) != MLU_OK)
            goto error;
        first = 0;
    }
    for (i = 0; i < n; i++) {
        mlu_st_entry *e = &entries[i];
        e->begin = off;
        if ((!first && (st = mlu_buf_putc(out, ',', err)) != MLU_OK) ||
            (st = mlu_json_put_string(out, e->name, e->name_len, err)) != MLU_OK ||
            (st = mlu_buf_puts(out, ":{\"dtype\":\"", err)) != MLU_OK ||
            (st = mlu_buf_puts(out, mlu_st_dtypes[e->dtype].name, err)) != MLU_OK ||
            (st = mlu_buf_puts(out, "\",\"shape\":[", err)) != MLU_OK)
            goto error;
        first = 0;
        for (k = 0; k < e->ndim; k++) {
            if ((k > 0 && (st = mlu_buf_putc(out, ',', err)) != MLU_OK) ||
                (st = put_u64(out, e->shape[k], err)) != MLU_OK)
                goto error;
        }
        if ((st = mlu_buf_puts(out, "],\"data_offsets\":[", err)) != MLU_OK ||
            (st = put_u64(out, off, err)) != MLU_OK || (st = mlu_buf_putc(out, ',', err)) != MLU_OK)
            goto error;
        if (mlu_add_overflow_u64(off, e->nbytes, &off)) {
            st = mlu_error_set(err, MLU_EOVERFLOW, -1, "the tensors' total size overflows 64 bits");
            goto error;
        }
        if ((st = put_u64(out, off, err)) != MLU_OK || (st = mlu_buf_puts(out, "]}", err)) != MLU_OK)
            goto error;
    }
    if ((st = mlu_buf_putc(out, '}', err)) != MLU_OK)
        goto error;
    while ((out->len - start - 8) % 8 != 0) {
        if ((st = mlu_buf_putc(out, ' ', err)) != MLU_OK)
            goto error;
    }
    json_len = (uint64_t)(out->len - start - 8);
    if (json_len > MLU_ST_MAX_HEADER) {
        st = mlu_error_set(err, MLU_EINVAL, -1,
                           "header too large: %" PRIu64 " bytes, the format's limit is %u (too many "
                           "tensors, or metadata too long)",
                           json_len, MLU_ST_MAX_HEADER);
        goto error;
    }
    /* The reader adds the data's end to 8 + N; so does this check. */
    if (mlu_add_overflow_u64(8 + json_len, off, &total)) {
        st = mlu_error_set(err, MLU_EOVERFLOW, -1,
                           "the file would have more than 2^64-1 bytes (%" PRIu64
                           " bytes of tensor data after a %" PRIu64 "-byte header)",
                           off, 8 + json_len);
        goto error;
    }
    for (k = 0; k < 8; k++)
        out->data[start + k] = (char)((json_len >> (8 * k)) & 0xFF);
    *data_len = off;
    st = MLU_OK;
error:
    return st;
}

mlu_status mlu_st_write_file(const char *path, const void *header, size_t header_len,
                             const mlu_st_entry *entries, size_t n, unsigned afile_flags,
                             mlu_error *err)
{
    mlu_status st;
    mlu_afile f;
    size_t i;

    st = mlu_afile_open(&f, path, afile_flags, err);
    if (st != MLU_OK)
        goto done;
    st = mlu_afile_write(&f, header, header_len, err);
    for (i = 0; i < n && st == MLU_OK; i++) {
        if (entries[i].nbytes > (uint64_t)SIZE_MAX) {
            st = mlu_error_set(err, MLU_EOVERFLOW, -1, "tensor '%.*s' is too large for this machine",
                               (int)entries[i].name_len, entries[i].name);
            break;
        }
        st = mlu_afile_write(&f, entries[i].data, (size_t)entries[i].nbytes, err);
    }
    if (st == MLU_OK)
        st = mlu_afile_commit(&f, err);
    else
        mlu_afile_abort(&f);
done:
    return st;
}

/* ------------------------------------------------------------------ files */

mlu_status mlu_st_read_header(int fd, uint64_t size, mlu_st_header *h, mlu_error *err)
{
    mlu_status st;
    uint8_t prefix[8] = {0};
    uint8_t *head = NULL;
    uint64_t n = 0;

    memset(h, 0, sizeof(*h));
    if (size < 8) {
        st = mlu_st_parse(prefix, size, h, err); /* too short: the parser says so in its words */
        goto done;
    }
    if ((st = mlu_file_read_at(fd, 0, prefix, 8, "the header length", err)) != MLU_OK)
        goto done;
    n = mlu_le64(prefix);
    if (n > MLU_ST_MAX_HEADER || 8 + n > size) {
        st = mlu_st_parse(prefix, size, h, err); /* refused from the 8 bytes alone */
        goto done;
    }
    head = mlu_malloc((size_t)(8 + n));
    if (head == NULL) {
        st = mlu_error_set(err, MLU_ENOMEM, -1, "cannot allocate the %" PRIu64 "-byte header", n);
        goto done;
    }
    memcpy(head, prefix, 8);
    if ((st = mlu_file_read_at(fd, 8, head + 8, (size_t)n, "the header", err)) != MLU_OK)
        goto done;
    st = mlu_st_parse(head, size, h, err);
done:
    mlu_free(head);
    return st;
}
