/* json.c: jansson-backed parsing, and the writer's token helpers. */
#define _GNU_SOURCE
#include "json.h"
#include "alloc.h"

#include <locale.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------- parsing */

/* jansson has no NaN/Infinity.  When the text has such bare tokens they are
 * rewritten into sentinel strings "\u0000NaN", "\u0000Inf", "\u0000-Inf",
 * and every \u0000 escape the text already had is doubled, so a string that
 * starts with exactly one NUL is always a sentinel. */

typedef struct rewrite {
    size_t new_start, new_len, orig_start, orig_len;
} rewrite;

static int is_ident(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
}

/* Which non-finite token (if any) starts at text[i] outside a string. */
static const char *nonfinite_at(const char *t, size_t i, size_t n, size_t *len)
{
    static const char *const toks[3] = {"NaN", "Infinity", "-Infinity"};
    static const char *const subs[3] = {"\"\\u0000NaN\"", "\"\\u0000Inf\"", "\"\\u0000-Inf\""};
    int k;

    for (k = 0; k < 3; k++) {
        size_t l = strlen(toks[k]);
        if (n - i >= l && memcmp(t + i, toks[k], l) == 0 && (i + l == n || !is_ident(t[i + l]))) {
            *len = l;
            return subs[k];
        }
    }
    return NULL;
}

/* One pass over the text.  With out == NULL only reports (1/0) whether a
 * non-finite token exists; else writes the rewritten text and the map. */
static int scan_nonfinite(const char *t, size_t n, mlu_buf *out, mlu_buf *map, mlu_status *st,
                          mlu_error *err)
{
    size_t i = 0;
    int found = 0;

    *st = MLU_OK;
    while (i < n) {
        char c = t[i];
        if (c == '"') {
            size_t j = i + 1;
            while (j < n && t[j] != '"') {
                if (t[j] == '\\' && j + 1 < n) {
                    if (out != NULL && t[j + 1] == 'u' && n - j >= 6 && memcmp(t + j + 2, "0000", 4) == 0) {
                        rewrite r;
                        if ((*st = mlu_buf_append(out, t + i, j - i, err)) != MLU_OK)
                            return found;
                        r.orig_start = j;
                        r.orig_len = 6;
                        r.new_start = out->len;
                        r.new_len = 12;
                        if ((*st = mlu_buf_append(out, "\\u0000\\u0000", 12, err)) != MLU_OK ||
                            (*st = mlu_buf_append(map, &r, sizeof(r), err)) != MLU_OK)
                            return found;
                        j += 6;
                        i = j;
                        continue;
                    }
                    j += 2;
                } else {
                    j++;
                }
            }
            j = j < n ? j + 1 : n;
            if (out != NULL && (*st = mlu_buf_append(out, t + i, j - i, err)) != MLU_OK)
                return found;
            i = j;
            continue;
        }
        if (c == 'N' || c == 'I' || c == '-') {
            size_t len = 0;
            const char *sub = nonfinite_at(t, i, n, &len);
            if (sub != NULL) {
                found = 1;
                if (out == NULL)
                    return 1;
                {
                    rewrite r;
                    r.orig_start = i;
                    r.orig_len = len;
                    r.new_start = out->len;
                    r.new_len = strlen(sub);
                    if ((*st = mlu_buf_append(out, sub, r.new_len, err)) != MLU_OK ||
                        (*st = mlu_buf_append(map, &r, sizeof(r), err)) != MLU_OK)
                        return found;
                }
                i += len;
                continue;
            }
        }
        if (out != NULL && (*st = mlu_buf_putc(out, c, err)) != MLU_OK)
            return found;
        i++;
    }
    return found;
}

/* Maps a byte offset in the rewritten text back to the caller's text. */
static size_t map_back(const mlu_buf *map, size_t pos)
{
    const rewrite *r = (const rewrite *)map->data;
    size_t k, count = map->len / sizeof(rewrite);
    long long delta = 0;

    for (k = 0; k < count; k++) {
        if (pos < r[k].new_start)
            break;
        if (pos < r[k].new_start + r[k].new_len)
            return r[k].orig_start;
        delta += (long long)r[k].new_len - (long long)r[k].orig_len;
    }
    return (size_t)((long long)pos - delta);
}

static void set_parse_error(const char *text, size_t n, size_t pos, const char *why,
                            mlu_error *err)
{
    size_t i;
    int line = 1, col = 1;

    if (pos > n)
        pos = n;
    for (i = 0; i < pos; i++) {
        unsigned char c = (unsigned char)text[i];
        if (c == '\n') {
            line++;
            col = 1;
        } else if ((c & 0xC0) != 0x80) {
            col++;
        }
    }
    mlu_error_set(err, MLU_EFORMAT, (int64_t)pos, "%s", why);
    if (err != NULL) {
        err->line = line;
        err->column = col;
    }
}

mlu_status mlu_json_parse(const char *text, size_t n, int flags, mlu_json_doc *doc,
                          mlu_error *err)
{
    mlu_status st = MLU_OK;
    mlu_buf rewritten = MLU_BUF_INIT, map = MLU_BUF_INIT;
    const char *src = text;
    size_t srclen = n;
    json_error_t jerr;
    size_t pos;

    doc->root = NULL;
    doc->nonfinite = 0;
    {
        /* A raw NUL is never valid JSON; jansson would stop reading at it. */
        const char *nul = memchr(text, '\0', n);
        if (nul != NULL) {
            set_parse_error(text, n, (size_t)(nul - text), "NUL byte in JSON text", err);
            st = MLU_EFORMAT;
            goto done;
        }
    }
    if ((flags & MLU_JSON_ALLOW_NONFINITE) && scan_nonfinite(text, n, NULL, NULL, &st, err)) {
        size_t cap;
        if (mlu_add_overflow_size(n, n / 2 + 64, &cap)) {
            st = mlu_error_set(err, MLU_EOVERFLOW, -1, "JSON text too large");
            goto done;
        }
        if ((st = mlu_buf_reserve(&rewritten, cap, err)) != MLU_OK)
            goto done;
        scan_nonfinite(text, n, &rewritten, &map, &st, err);
        if (st != MLU_OK)
            goto done;
        src = rewritten.data;
        srclen = rewritten.len;
        doc->nonfinite = 1;
    }
    doc->root = json_loadb(src, srclen, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY | JSON_ALLOW_NUL,
                           &jerr);
    if (doc->root == NULL) {
        /* jansson returns NULL without any message when one of its own
         * allocations fails (lexer buffers, new objects and arrays). */
        if (json_error_code(&jerr) == json_error_out_of_memory || jerr.text[0] == '\0') {
            st = mlu_error_set(err, MLU_ENOMEM, -1, "out of memory parsing JSON");
            goto done;
        }
        pos = jerr.position > 0 ? (size_t)jerr.position : 0;
        /* jansson reports the position after the offending token; step back
         * onto it so line/column point at the problem. */
        if (pos > 0 && pos <= srclen && json_error_code(&jerr) != json_error_premature_end_of_input)
            pos--;
        if (doc->nonfinite)
            pos = map_back(&map, pos);
        set_parse_error(text, n, pos, jerr.text, err);
        st = MLU_EFORMAT;
    }
done:
    mlu_buf_free(&rewritten);
    mlu_buf_free(&map);
    return st;
}

void mlu_json_doc_free(mlu_json_doc *doc)
{
    if (doc->root != NULL)
        json_decref(doc->root);
    doc->root = NULL;
}

int mlu_json_string_value(const mlu_json_doc *doc, json_t *str, const char **s, size_t *n,
                          double *number, char **tmp, mlu_error *err)
{
    const char *v = json_string_value(str);
    size_t len = json_string_length(str), i, o;
    char *copy;

    *tmp = NULL;
    *s = v;
    *n = len;
    if (!doc->nonfinite || len == 0 || memchr(v, '\0', len) == NULL)
        return 0;
    if (v[0] == '\0' && (len == 1 || v[1] != '\0')) {
        if (len == 4 && memcmp(v + 1, "NaN", 3) == 0) {
            *number = NAN;
            return 1;
        }
        if (len == 4 && memcmp(v + 1, "Inf", 3) == 0) {
            *number = INFINITY;
            return 1;
        }
        if (len == 5 && memcmp(v + 1, "-Inf", 4) == 0) {
            *number = -INFINITY;
            return 1;
        }
    }
    /* A real string with NULs, doubled by the rewrite: halve them. */
    copy = mlu_malloc(len);
    if (copy == NULL) {
        mlu_error_set(err, MLU_ENOMEM, -1, "out of memory");
        return -1;
    }
    for (i = 0, o = 0; i < len; i++) {
        copy[o++] = v[i];
        if (v[i] == '\0' && i + 1 < len && v[i + 1] == '\0')
            i++;
    }
    *tmp = copy;
    *s = copy;
    *n = o;
    return 0;
}

/* ---------------------------------------------------------------- writing */

mlu_status mlu_json_put_string(mlu_buf *b, const char *s, size_t n, mlu_error *err)
{
    static const char hex[] = "0123456789abcdef";
    mlu_status st;
    size_t i, run = 0, worst;

    /* One reservation for the worst case keeps the loop free of checks. */
    if (mlu_mul_overflow_size(n, 6, &worst) || mlu_add_overflow_size(worst, 2, &worst))
        return mlu_error_set(err, MLU_EOVERFLOW, -1, "string too long to encode");
    if ((st = mlu_buf_reserve(b, worst, err)) != MLU_OK)
        return st;
    b->data[b->len++] = '"';
    for (i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        char esc = 0;
        if (c >= 0x20 && c != '"' && c != '\\')
            continue;
        memcpy(b->data + b->len, s + run, i - run);
        b->len += i - run;
        run = i + 1;
        switch (c) {
        case '"': esc = '"'; break;
        case '\\': esc = '\\'; break;
        case '\b': esc = 'b'; break;
        case '\f': esc = 'f'; break;
        case '\n': esc = 'n'; break;
        case '\r': esc = 'r'; break;
        case '\t': esc = 't'; break;
        default: break;
        }
        b->data[b->len++] = '\\';
        if (esc) {
            b->data[b->len++] = esc;
        } else {
            b->data[b->len++] = 'u';
            b->data[b->len++] = '0';
            b->data[b->len++] = '0';
            b->data[b->len++] = hex[c >> 4];
            b->data[b->len++] = hex[c & 15];
        }
    }
    memcpy(b->data + b->len, s + run, n - run);
    b->len += n - run;
    b->data[b->len++] = '"';
    return MLU_OK;
}

/* Number text must not depend on the process locale (a decimal comma). */
static locale_t c_locale;
static pthread_once_t c_locale_once = PTHREAD_ONCE_INIT;

static void make_c_locale(void)
{
    c_locale = newlocale(LC_NUMERIC_MASK, "C", (locale_t)0);
}

/* "%.4f" of the decimal text s (or, when s is NULL, of v), in the C locale.
 * Returns the length or -1. */
static int format_4f(const char *s, double v, char *out, size_t cap)
{
    locale_t old = (locale_t)0;
    int w;

    pthread_once(&c_locale_once, make_c_locale);
    if (c_locale != (locale_t)0)
        old = uselocale(c_locale);
    if (s != NULL)
        v = strtod(s, NULL);
    w = snprintf(out, cap, "%.4f", v);
    if (c_locale != (locale_t)0)
        uselocale(old);
    return (w < 0 || (size_t)w >= cap) ? -1 : w;
}

static int is_digit(char c)
{
    return c >= '0' && c <= '9';
}

mlu_status mlu_json_put_number(mlu_buf *b, const char *tok, size_t n, int truncate,
                               mlu_error *err)
{
    mlu_status st = MLU_OK;
    size_t i = 0;

    if (!truncate)
        return mlu_buf_append(b, tok, n, err);
    while (i < n) {
        size_t start = i, dot, end;
        if (!is_digit(tok[i])) {
            if ((st = mlu_buf_putc(b, tok[i], err)) != MLU_OK)
                return st;
            i++;
            continue;
        }
        while (i < n && is_digit(tok[i]))
            i++;
        dot = i;
        end = dot;
        if (dot < n && tok[dot] == '.') {
            end = dot + 1;
            while (end < n && is_digit(tok[end]))
                end++;
        }
        if (dot < n && tok[dot] == '.' && end - dot - 1 >= 8) {
            char tmp[64], out[400];
            size_t len = end - start;
            int w;
            if (len >= sizeof(tmp)) {
                /* Longer than any double's repr: keep the text as it is. */
                if ((st = mlu_buf_append(b, tok + start, len, err)) != MLU_OK)
                    return st;
            } else {
                memcpy(tmp, tok + start, len);
                tmp[len] = '\0';
                w = format_4f(tmp, 0.0, out, sizeof(out));
                if (w < 0)
                    return mlu_error_set(err, MLU_EOVERFLOW, -1, "number too long to truncate");
                if ((st = mlu_buf_append(b, out, (size_t)w, err)) != MLU_OK)
                    return st;
            }
            i = end;
        } else {
            if ((st = mlu_buf_append(b, tok + start, dot - start, err)) != MLU_OK)
                return st;
            i = dot;
        }
    }
    return st;
}

mlu_status mlu_json_put_int(mlu_buf *b, long long v, mlu_error *err)
{
    char tmp[24];
    char *end = tmp + sizeof(tmp), *p = end;
    unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;

    do {
        *--p = (char)('0' + (u % 10));
        u /= 10;
    } while (u != 0);
    if (v < 0)
        *--p = '-';
    return mlu_buf_append(b, p, (size_t)(end - p), err);
}

mlu_status mlu_json_put_fixed4(mlu_buf *b, double v, mlu_error *err)
{
    double a = fabs(v), scaled = a * 1e4, fl;
    char out[400];
    int w;

    /* Fast path: the product is exact to within 2^-12 below 2^40, so when it
     * is not near a tie, rounding it gives the correctly rounded result. */
    if (scaled < 1099511627776.0) {
        fl = floor(scaled);
        if (fabs(scaled - fl - 0.5) > 1e-3) {
            unsigned long long r = (unsigned long long)fl + (scaled - fl > 0.5 ? 1 : 0);
            char tmp[40];
            char *end = tmp + sizeof(tmp), *p = end;
            unsigned long long ip = r / 10000, fp = r % 10000;
            int k;
            for (k = 0; k < 4; k++) {
                *--p = (char)('0' + fp % 10);
                fp /= 10;
            }
            *--p = '.';
            do {
                *--p = (char)('0' + ip % 10);
                ip /= 10;
            } while (ip != 0);
            if (signbit(v))
                *--p = '-';
            return mlu_buf_append(b, p, (size_t)(end - p), err);
        }
    }
    /* v itself, not a text round trip: printing it would follow the
     * process locale (a decimal comma) and the C-locale reparse stop there. */
    w = format_4f(NULL, v, out, sizeof(out));
    if (w < 0)
        return mlu_error_set(err, MLU_EOVERFLOW, -1, "number too long to format");
    return mlu_buf_append(b, out, (size_t)w, err);
}

mlu_status mlu_json_truncate_text(const char *t, size_t n, mlu_buf *out, mlu_error *err)
{
    mlu_status st = MLU_OK;
    size_t i = 0;

    if ((st = mlu_buf_reserve(out, n, err)) != MLU_OK)
        return st;
    while (i < n) {
        size_t j = i;
        if (t[i] == '"') {
            j++;
            while (j < n && t[j] != '"')
                j += (t[j] == '\\' && j + 1 < n) ? 2 : 1;
            j = j < n ? j + 1 : n;
            st = mlu_buf_append(out, t + i, j - i, err);
        } else if (is_digit(t[i])) {
            while (j < n && (is_digit(t[j]) || t[j] == '.' || t[j] == 'e' || t[j] == 'E' ||
                             t[j] == '+' || t[j] == '-'))
                j++;
            st = mlu_json_put_number(out, t + i, j - i, 1, err);
        } else {
            while (j < n && t[j] != '"' && !is_digit(t[j]))
                j++;
            st = mlu_buf_append(out, t + i, j - i, err);
        }
        if (st != MLU_OK)
            return st;
        i = j;
    }
    return st;
}
