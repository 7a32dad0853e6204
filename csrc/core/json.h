/* json.h: the JSON pieces of the core.
 *
 * Parsing goes through jansson (duplicate keys rejected, its depth cap);
 * writing is done by the callers straight into an mlu_buf with the helpers
 * below, which produce the same text as Python's json.dumps(ensure_ascii=False). */
#ifndef MLU_JSON_H
#define MLU_JSON_H

#include <jansson.h>

#include "../mlu.h"
#include "buf.h"

/* mlu_json_parse flags */
#define MLU_JSON_ALLOW_NONFINITE 0x1  /* accept bare NaN, Infinity, -Infinity as Python's json does */

typedef struct mlu_json_doc {
    json_t *root;          /* owned (json_decref) */
    int nonfinite;         /* 1: strings may be sentinels, see mlu_json_string_value */
} mlu_json_doc;

/* Parses n bytes of UTF-8.  On failure err has code MLU_EFORMAT, the byte
 * offset of the problem in the caller's text, and line/column (1-based,
 * column in characters). */
mlu_status mlu_json_parse(const char *text, size_t n, int flags, mlu_json_doc *doc,
                          mlu_error *err);
void mlu_json_doc_free(mlu_json_doc *doc);

/* Reads a string value of a document parsed with MLU_JSON_ALLOW_NONFINITE.
 * Returns 1 and sets *number when the string stands for NaN/Infinity;
 * otherwise returns 0 and sets *s and *n to the real string.  *tmp may receive
 * a new buffer the caller frees with mlu_free (when the text had NULs). */
int mlu_json_string_value(const mlu_json_doc *doc, json_t *str, const char **s, size_t *n,
                          double *number, char **tmp, mlu_error *err);

/* Appends a quoted JSON string: escapes '"', '\\' and control characters
 * (\b \t \n \f \r or \u00xx, lowercase hex); other bytes are copied. */
mlu_status mlu_json_put_string(mlu_buf *b, const char *s, size_t n, mlu_error *err);

/* Appends the number token `tok` (n bytes).  With truncate, every run
 * "digits '.' 8-or-more digits" inside it is rewritten as that value with 4
 * fractional digits ("%.4f"), as the original helpers' regex did. */
mlu_status mlu_json_put_number(mlu_buf *b, const char *tok, size_t n, int truncate,
                               mlu_error *err);

/* Appends a signed 64-bit integer in decimal. */
mlu_status mlu_json_put_int(mlu_buf *b, long long v, mlu_error *err);

/* Appends v with exactly 4 fractional digits, correctly rounded (as
 * "%.4f" / Python's "{:.4f}" would print it). */
mlu_status mlu_json_put_fixed4(mlu_buf *b, double v, mlu_error *err);

/* truncate_json over JSON text: number tokens outside strings are truncated
 * as by mlu_json_put_number; strings and everything else are copied. */
mlu_status mlu_json_truncate_text(const char *text, size_t n, mlu_buf *out, mlu_error *err);

#endif
