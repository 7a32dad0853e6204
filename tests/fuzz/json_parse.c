/* json_parse.c: fuzz harness for the JSON reader (strict and with bare
 * NaN/Infinity) and for truncate_json over raw text.
 *
 * libFuzzer:  make fuzz   (scripts/fuzz.sh)
 * replay:     make fuzz-replay-json   (gcc + ASan/UBSan over tests/fuzz/corpus_json_parse/)
 *
 * Besides not crashing or leaking:
 *  - a refusal is MLU_EFORMAT (or ENOMEM/EOVERFLOW) with a message, an offset
 *    inside the text and a 1-based line/column;
 *  - text the strict parser accepts is accepted unchanged by the lenient one;
 *  - a lenient document written back (sentinels as bare tokens, strings with
 *    their NULs) parses again to a document that writes the same text;
 *  - truncate_json keeps valid JSON valid, and changes it only once;
 *  - with a core allocation failing (fuzz_oom.h) nothing leaks and every
 *    refusal still says why.  jansson's own allocations are left alone: its
 *    lexer asserts when saving a character fails (load.c, lex_unget_unsave)
 *    and reports a failed string copy as a syntax error; test_core.c covers
 *    the failures it does report (as ENOMEM). */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/alloc.h"
#include "core/buf.h"
#include "core/json.h"
#include "fuzz_oom.h"

static void check_refusal(size_t n, const mlu_error *err, int reliable)
{
    if (!reliable && err->code == MLU_ENOMEM && err->text[0] != '\0')
        return;
    if (err->code != MLU_EFORMAT && err->code != MLU_ENOMEM && err->code != MLU_EOVERFLOW)
        abort();
    if (err->text[0] == '\0')
        abort(); /* every refusal says why */
    if (err->code == MLU_EFORMAT) {
        if (err->offset < 0 || (uint64_t)err->offset > n)
            abort();
        if (err->line < 1 || err->column < 1)
            abort();
    }
}

/* Writes doc's value v as JSON text; returns MLU_OK or the first failure. */
static mlu_status write_value(const mlu_json_doc *doc, json_t *v, mlu_buf *b, mlu_error *err)
{
    mlu_status st = MLU_OK;

    switch (json_typeof(v)) {
    case JSON_OBJECT: {
        const char *key;
        json_t *item;
        int first = 1;
        if ((st = mlu_buf_putc(b, '{', err)) != MLU_OK)
            return st;
        json_object_foreach(v, key, item) {
            if (!first && (st = mlu_buf_putc(b, ',', err)) != MLU_OK)
                return st;
            first = 0;
            if ((st = mlu_json_put_string(b, key, strlen(key), err)) != MLU_OK ||
                (st = mlu_buf_putc(b, ':', err)) != MLU_OK ||
                (st = write_value(doc, item, b, err)) != MLU_OK)
                return st;
        }
        return mlu_buf_putc(b, '}', err);
    }
    case JSON_ARRAY: {
        size_t i;
        if ((st = mlu_buf_putc(b, '[', err)) != MLU_OK)
            return st;
        for (i = 0; i < json_array_size(v); i++) {
            if (i > 0 && (st = mlu_buf_putc(b, ',', err)) != MLU_OK)
                return st;
            if ((st = write_value(doc, json_array_get(v, i), b, err)) != MLU_OK)
                return st;
        }
        return mlu_buf_putc(b, ']', err);
    }
    case JSON_STRING: {
        const char *s;
        size_t n;
        double number = 0;
        char *tmp = NULL;
        int r = mlu_json_string_value(doc, v, &s, &n, &number, &tmp, err);
        if (r < 0)
            return err->code;
        if (r == 1) {
            if (tmp != NULL || !(isnan(number) || isinf(number)))
                abort();
            st = mlu_buf_puts(b, isnan(number) ? "NaN" : number > 0 ? "Infinity" : "-Infinity", err);
        } else {
            st = mlu_json_put_string(b, s, n, err);
        }
        mlu_free(tmp);
        return st;
    }
    case JSON_INTEGER:
        return mlu_json_put_int(b, (long long)json_integer_value(v), err);
    case JSON_REAL: {
        char tmp[40];
        double d = json_real_value(v);
        int w = snprintf(tmp, sizeof(tmp), "%.17g", d);
        if (w < 0 || (size_t)w >= sizeof(tmp) || !isfinite(d))
            abort();
        if ((st = mlu_json_put_number(b, tmp, (size_t)w, 0, err)) != MLU_OK)
            return st;
        if (strpbrk(tmp, ".e") == NULL)
            st = mlu_buf_puts(b, ".0", err); /* stays a real when read back */
        return st;
    }
    case JSON_TRUE:
        return mlu_buf_puts(b, "true", err);
    case JSON_FALSE:
        return mlu_buf_puts(b, "false", err);
    case JSON_NULL:
        return mlu_buf_puts(b, "null", err);
    }
    abort();
}

/* Lenient document -> text -> document -> text: both texts must agree. */
static void check_round_trip(const mlu_json_doc *doc, int reliable)
{
    mlu_buf one = MLU_BUF_INIT, two = MLU_BUF_INIT;
    mlu_json_doc again = {NULL, 0};
    mlu_error err;

    mlu_error_clear(&err);
    if (write_value(doc, doc->root, &one, &err) != MLU_OK) {
        if (err.code != MLU_ENOMEM || reliable)
            abort();
        goto done;
    }
    mlu_error_clear(&err);
    if (mlu_json_parse(one.data, one.len, MLU_JSON_ALLOW_NONFINITE, &again, &err) != MLU_OK) {
        if (reliable)
            abort(); /* what we wrote must read back */
        goto done;
    }
    mlu_error_clear(&err);
    if (write_value(&again, again.root, &two, &err) != MLU_OK) {
        if (err.code != MLU_ENOMEM || reliable)
            abort();
        goto done;
    }
    if (one.len != two.len || (one.len > 0 && memcmp(one.data, two.data, one.len) != 0))
        abort();
done:
    mlu_json_doc_free(&again);
    mlu_buf_free(&one);
    mlu_buf_free(&two);
}

static void check_truncate(const char *text, size_t n, int valid, int reliable)
{
    mlu_buf once = MLU_BUF_INIT, twice = MLU_BUF_INIT;
    mlu_json_doc doc = {NULL, 0};
    mlu_error err;

    mlu_error_clear(&err);
    if (mlu_json_truncate_text(text, n, &once, &err) != MLU_OK) {
        if ((err.code != MLU_ENOMEM || reliable) && err.code != MLU_EOVERFLOW)
            abort();
        goto done;
    }
    mlu_error_clear(&err);
    if (mlu_json_truncate_text(once.data, once.len, &twice, &err) != MLU_OK) {
        if ((err.code != MLU_ENOMEM || reliable) && err.code != MLU_EOVERFLOW)
            abort();
        goto done;
    }
    /* (on arbitrary text a run like 1.123456789.123456789 changes twice) */
    if (valid && (once.len != twice.len || (once.len > 0 && memcmp(once.data, twice.data, once.len) != 0)))
        abort();
    if (valid) {
        mlu_error_clear(&err);
        if (mlu_json_parse(once.data, once.len, 0, &doc, &err) != MLU_OK && reliable)
            abort();
    }
done:
    mlu_json_doc_free(&doc);
    mlu_buf_free(&once);
    mlu_buf_free(&twice);
}

static void run(const uint8_t *data, size_t size, int reliable)
{
    const char *text = (const char *)data;
    mlu_json_doc strict = {NULL, 0}, lenient = {NULL, 0};
    mlu_error err;
    int strict_ok, lenient_ok;

    mlu_error_clear(&err);
    strict_ok = mlu_json_parse(text, size, 0, &strict, &err) == MLU_OK;
    if (strict_ok) {
        if (strict.root == NULL || strict.nonfinite)
            abort();
    } else {
        check_refusal(size, &err, reliable);
        if (strict.root != NULL)
            abort();
    }
    mlu_error_clear(&err);
    lenient_ok = mlu_json_parse(text, size, MLU_JSON_ALLOW_NONFINITE, &lenient, &err) == MLU_OK;
    if (lenient_ok) {
        if (lenient.root == NULL)
            abort();
        if (strict_ok && (lenient.nonfinite || !json_equal(strict.root, lenient.root)))
            abort();
        check_round_trip(&lenient, reliable);
    } else {
        check_refusal(size, &err, reliable);
        if (strict_ok && reliable)
            abort(); /* strict JSON is lenient JSON */
    }
    check_truncate(text, size, strict_ok, reliable);
    mlu_json_doc_free(&strict);
    mlu_json_doc_free(&lenient);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    FUZZ_WITH_OOM(run, data, size);
    return 0;
}

#include "pt_replay.h"
