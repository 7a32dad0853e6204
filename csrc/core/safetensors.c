/* safetensors.c: header validation, byte-identical header writing, file mappings. */
#define _GNU_SOURCE
#include "safetensors.h"
#include "alloc.h"
#include "atomicfile.h"
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

static const char *const dtype_names[MLU_ST_DTYPE_COUNT] = {
    "BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0",
    "F8_E4M3FNUZ", "F8_E5M2FNUZ", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64",
    "F64", "I64", "U64",
};

static const unsigned char dtype_bits[MLU_ST_DTYPE_COUNT] = {
    8, 4, 6, 6, 8, 8, 8, 8, 8, 8, 8, 16, 16, 16, 16, 32, 32, 32, 64, 64, 64, 64,
};

const char *mlu_st_dtype_name(int dtype)
{
    if (dtype < 0 || dtype >= MLU_ST_DTYPE_COUNT)
        return NULL;
    return dtype_names[dtype];
}

int mlu_st_dtype_from_name(const char *name, size_t n)
{
    int i;

    for (i = 0; i < MLU_ST_DTYPE_COUNT; i++) {
        if (strlen(dtype_names[i]) == n && memcmp(dtype_names[i], name, n) == 0)
            return i;
    }
    return -1;
}

unsigned mlu_st_dtype_bits(int dtype)
{
    if (dtype < 0 || dtype >= MLU_ST_DTYPE_COUNT)
        return 0;
    return dtype_bits[dtype];
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

/* Index of the first byte that is not valid UTF-8, or n when all is valid. */
static size_t utf8_invalid_at(const uint8_t *s, size_t n)
{
    size_t i = 0;

    while (i < n) {
        uint8_t c = s[i];
        size_t len, k;
        uint32_t cp;
        if (c < 0x80) {
            i++;
            continue;
        }
        if (c >= 0xC2 && c <= 0xDF) {
            len = 2;
            cp = c & 0x1F;
        } else if (c >= 0xE0 && c <= 0xEF) {
            len = 3;
            cp = c & 0x0F;
        } else if (c >= 0xF0 && c <= 0xF4) {
            len = 4;
            cp = c & 0x07;
        } else {
            return i;
        }
        if (n - i < len)
            return i;
        for (k = 1; k < len; k++) {
            if ((s[i + k] & 0xC0) != 0x80)
                return i;
            cp = (cp << 6) | (s[i + k] & 0x3F);
        }
        if ((len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10FFFF)) ||
            (cp >= 0xD800 && cp <= 0xDFFF))
            return i;
        i += len;
    }
    return n;
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

/* A JSON value that must be a non-negative integer (serde's u64/usize). */
static int get_uint(const json_t *v, uint64_t *out)
{
    json_int_t i;

    if (!json_is_integer(v))
        return 0;
    i = json_integer_value(v);
    if (i < 0)
        return 0;
    *out = (uint64_t)i;
    return 1;
}

static mlu_status parse_tensor(const char *name, size_t nlen, json_t *obj, mlu_st_tensor *t,
                               mlu_error *err)
{
    mlu_status st = MLU_EFORMAT;
    json_t *dtype, *shape, *offs;
    size_t i;

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
        if (!get_uint(d, &t->shape[i])) {
            st = mlu_error_set(err, MLU_EFORMAT, -1,
                               "tensor '%.*s%s': shape[%zu] must be a non-negative integer, found %s",
                               SHOW(name, nlen), ELLIPSIS(nlen), i,
                               json_is_integer(d) ? "a negative integer" : json_kind(d));
            goto error;
        }
    }
    if (!json_is_array(offs) || json_array_size(offs) != 2 ||
        !get_uint(json_array_get(offs, 0), &t->begin) ||
        !get_uint(json_array_get(offs, 1), &t->end)) {
        st = mlu_error_set(err, MLU_EFORMAT, -1,
                           "tensor '%.*s%s': data_offsets must be [begin, end] with non-negative integers",
                           SHOW(name, nlen), ELLIPSIS(nlen));
        goto error;
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

/* The offset rules, in the reference's order, over tensors sorted by offset. */
static mlu_status check_layout(mlu_st_header *h, uint64_t size, mlu_error *err)
{
    uint64_t prev_end = 0, total;
    size_t i, k;

    for (i = 0; i < h->ntensors; i++) {
        const mlu_st_tensor *t = &h->tensors[i];
        uint64_t nelem = 1, nbits;
        unsigned bits = mlu_st_dtype_bits(t->dtype);
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
        for (k = 0; k < t->ndim; k++) {
            if (mlu_mul_overflow_u64(nelem, t->shape[k], &nelem))
                return mlu_error_set(err, MLU_EFORMAT, -1,
                                     "tensor '%.*s%s': the element count of its shape overflows 64 bits",
                                     SHOW(t->name, t->name_len), ELLIPSIS(t->name_len));
        }
        if (mlu_mul_overflow_u64(nelem, bits, &nbits))
            return mlu_error_set(err, MLU_EFORMAT, -1,
                                 "tensor '%.*s%s': the bit size of its shape overflows 64 bits",
                                 SHOW(t->name, t->name_len), ELLIPSIS(t->name_len));
        if (nbits % 8 != 0)
            return mlu_error_set(err, MLU_EFORMAT, -1,
                                 "tensor '%.*s%s': misaligned slice: %" PRIu64 " elements of %s are %"
                                 PRIu64 " bits, not a whole number of bytes",
                                 SHOW(t->name, t->name_len), ELLIPSIS(t->name_len), nelem,
                                 dtype_names[t->dtype], nbits);
        if (t->end - t->begin != nbits / 8)
            return mlu_error_set(err, MLU_EFORMAT, (int64_t)(h->data_start + t->begin),
                                 "tensor '%.*s%s': shape and dtype %s need %" PRIu64
                                 " bytes but data_offsets [%" PRIu64 ", %" PRIu64 "] hold %" PRIu64,
                                 SHOW(t->name, t->name_len), ELLIPSIS(t->name_len),
                                 dtype_names[t->dtype], nbits / 8, t->begin, t->end,
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
    uint64_t n = 0;
    size_t bad, i, cap;
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
    for (i = 0; i < 8; i++)
        n |= (uint64_t)data[i] << (8 * i);
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
    bad = utf8_invalid_at(data + 8, (size_t)n);
    if (bad != (size_t)n) {
        st = mlu_error_set(err, MLU_EFORMAT, (int64_t)(8 + bad),
                           "header is not valid UTF-8 (byte offset %" PRIu64 ")",
                           (uint64_t)(8 + bad));
        goto error;
    }
    if ((st = mlu_json_parse((const char *)data + 8, (size_t)n, 0, &doc, err)) != MLU_OK) {
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
            st = parse_tensor(key, klen, val, &h->tensors[h->ntensors], err);
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
    uint64_t nelem = 1, nbits;
    unsigned bits = mlu_st_dtype_bits(e->dtype);
    size_t k;

    if (bits == 0)
        return mlu_error_set(err, MLU_EINVAL, -1, "tensor '%.*s%s': invalid dtype code %d",
                             SHOW(e->name, e->name_len), ELLIPSIS(e->name_len), e->dtype);
    if (e->name_len == 12 && memcmp(e->name, "__metadata__", 12) == 0)
        return mlu_error_set(err, MLU_EINVAL, -1,
                             "'__metadata__' is reserved for the header's metadata and cannot name a tensor");
    for (k = 0; k < e->ndim; k++) {
        if (mlu_mul_overflow_u64(nelem, e->shape[k], &nelem))
            return mlu_error_set(err, MLU_EOVERFLOW, -1,
                                 "tensor '%.*s%s': the element count overflows 64 bits",
                                 SHOW(e->name, e->name_len), ELLIPSIS(e->name_len));
    }
    if (mlu_mul_overflow_u64(nelem, bits, &nbits))
        return mlu_error_set(err, MLU_EOVERFLOW, -1, "tensor '%.*s%s': the size overflows 64 bits",
                             SHOW(e->name, e->name_len), ELLIPSIS(e->name_len));
    if (nbits % 8 != 0)
        return mlu_error_set(err, MLU_EINVAL, -1,
                             "tensor '%.*s%s': %" PRIu64 " elements of %s are not a whole number of bytes",
                             SHOW(e->name, e->name_len), ELLIPSIS(e->name_len), nelem,
                             dtype_names[e->dtype]);
    if (nbits / 8 != e->nbytes)
        return mlu_error_set(err, MLU_EINVAL, -1,
                             "tensor '%.*s%s': shape and dtype %s need %" PRIu64
                             " bytes but the data has %" PRIu64,
                             SHOW(e->name, e->name_len), ELLIPSIS(e->name_len),
                             dtype_names[e->dtype], nbits / 8, e->nbytes);
    return MLU_OK;
}

mlu_status mlu_st_build_header(mlu_st_entry *entries, size_t n, mlu_st_kv *meta, size_t nmeta,
                               int has_metadata, mlu_buf *out, uint64_t *data_len,
                               mlu_error *err)
{
    mlu_status st = MLU_OK;
    uint64_t off = 0, json_len;
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
            (st = mlu_buf_puts(out, dtype_names[e->dtype], err)) != MLU_OK ||
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
    for (k = 0; k < 8; k++)
        out->data[start + k] = (char)((json_len >> (8 * k)) & 0xFF);
    *data_len = off;
    st = MLU_OK;
error:
    return st;
}

/* Starts writeback of what was written so far every WRITEBACK_STEP bytes,
 * so the final fsync overlaps with copying instead of following it. */
#define WRITEBACK_STEP ((uint64_t)32 << 20)

static mlu_status write_chunked(mlu_afile *f, const uint8_t *p, uint64_t n, uint64_t *flushed,
                                mlu_error *err)
{
    mlu_status st = MLU_OK;

    while (n > 0 && st == MLU_OK) {
        uint64_t room = *flushed + WRITEBACK_STEP - f->written;
        size_t chunk = (size_t)(n < room ? n : room);
        st = mlu_afile_write(f, p, chunk, err);
        p += chunk;
        n -= chunk;
        if (st == MLU_OK && f->written - *flushed >= WRITEBACK_STEP) {
#ifdef SYNC_FILE_RANGE_WRITE
            /* Advisory: a filesystem that refuses it only loses the overlap. */
            (void)sync_file_range(f->fd, (off64_t)*flushed, (off64_t)(f->written - *flushed),
                                  SYNC_FILE_RANGE_WRITE);
#endif
            *flushed = f->written;
        }
    }
    return st;
}

mlu_status mlu_st_write_file(const char *path, const void *header, size_t header_len,
                             const mlu_st_entry *entries, size_t n, mlu_error *err)
{
    mlu_status st;
    mlu_afile f;
    uint64_t flushed = 0;
    size_t i;

    st = mlu_afile_open(&f, path, err);
    if (st != MLU_OK)
        goto done;
    st = write_chunked(&f, header, header_len, &flushed, err);
    for (i = 0; i < n && st == MLU_OK; i++)
        st = write_chunked(&f, entries[i].data, entries[i].nbytes, &flushed, err);
    if (st == MLU_OK)
        st = mlu_afile_commit(&f, err);
    else
        mlu_afile_abort(&f);
done:
    return st;
}

/* ------------------------------------------------------------------ mappings */

mlu_status mlu_st_map_file(const char *path, uint8_t **base, size_t *len, mlu_error *err)
{
    mlu_status st = MLU_EIO;
    struct stat sb;
    int fd;
    void *p;

    *base = NULL;
    *len = 0;
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        st = mlu_error_errno(err, errno, "cannot open '%s'", path);
        goto done;
    }
    if (fstat(fd, &sb) != 0) {
        st = mlu_error_errno(err, errno, "cannot stat '%s'", path);
        goto done;
    }
    if (S_ISDIR(sb.st_mode)) {
        st = mlu_error_errno(err, EISDIR, "'%s' is a folder", path);
        goto done;
    }
    if (!S_ISREG(sb.st_mode)) {
        st = mlu_error_errno(err, EINVAL, "'%s' is not a regular file", path);
        goto done;
    }
    if (sb.st_size < 0 || (uint64_t)sb.st_size > (uint64_t)SIZE_MAX) {
        st = mlu_error_set(err, MLU_EOVERFLOW, -1, "'%s' is too large to map", path);
        goto done;
    }
    if (sb.st_size > 0) {
        p = mmap(NULL, (size_t)sb.st_size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
        if (p == MAP_FAILED) {
            st = mlu_error_errno(err, errno, "cannot map '%s'", path);
            goto done;
        }
        *base = p;
        *len = (size_t)sb.st_size;
    }
    st = MLU_OK;
done:
    if (fd >= 0)
        close(fd);
    return st;
}

mlu_status mlu_st_map_anon(size_t len, uint8_t **base, mlu_error *err)
{
    void *p = mmap(NULL, len ? len : 1, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

    *base = NULL;
    if (p == MAP_FAILED)
        return mlu_error_set(err, MLU_ENOMEM, -1, "cannot map %zu bytes of memory", len);
    *base = p;
    return MLU_OK;
}

void mlu_st_unmap(uint8_t *base, size_t len)
{
    if (base != NULL)
        munmap(base, len ? len : 1);
}
