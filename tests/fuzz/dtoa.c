/* dtoa.c: fuzz harness for mlu_dtoa (shortest round-trip double -> text).
 *
 * Input: 8 bytes or more are the bits of a double (little-endian, and every
 * further 8 bytes another one); shorter input is read as decimal text with
 * strtod.  Checks, besides not crashing: the text reads back (strtod) to the
 * same bits; no decimal with one digit fewer does (the correctly rounded one
 * of that length misses); the digits are the correctly rounded ones of their
 * length when that one reads back; the output fits MLU_DTOA_BUFSIZE;
 * fixed notation has a '.', an exponent has a sign and two digits or more.
 * Failures abort, so libFuzzer and the replay both stop on them. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/dtoa.h"

static uint64_t bits_of(double d)
{
    uint64_t b;
    memcpy(&b, &d, sizeof(b));
    return b;
}

static void sig_digits(const char *s, char *out)
{
    char *o = out;
    int started = 0;
    for (; *s && *s != 'e'; s++) {
        if (*s < '0' || *s > '9' || (*s == '0' && !started))
            continue;
        started = 1;
        *o++ = *s;
    }
    while (o > out && o[-1] == '0')
        o--;
    *o = '\0';
}

static void fail(const char *what, double v, const char *s)
{
    fprintf(stderr, "dtoa: %s for %a: %s\n", what, v, s);
    abort();
}

static void check(double v)
{
    char s[MLU_DTOA_BUFSIZE + 8], ref[64], dig[40], refdig[40];
    size_t n;
    int nd;

    memset(s, 'x', sizeof(s));
    n = mlu_dtoa(v, s);
    if (n >= MLU_DTOA_BUFSIZE || s[n] != '\0' || strlen(s) != n)
        fail("length", v, s);
    if (isnan(v)) {
        if (strcmp(s, "nan") != 0)
            fail("nan text", v, s);
        return;
    }
    if (bits_of(strtod(s, NULL)) != bits_of(v))
        fail("no round trip", v, s);
    if (v == 0 || isinf(v))
        return;
    sig_digits(s, dig);
    nd = (int)strlen(dig);
    snprintf(ref, sizeof(ref), "%.*e", nd - 1, v);
    sig_digits(ref, refdig);
    if (bits_of(strtod(ref, NULL)) == bits_of(v) && strcmp(refdig, dig) != 0)
        fail("not the nearest digits", v, s);
    if (nd > 1) {
        snprintf(ref, sizeof(ref), "%.*e", nd - 2, v);
        if (bits_of(strtod(ref, NULL)) == bits_of(v))
            fail("not the shortest", v, s);
    }
    {
        const char *e = strchr(s, 'e');
        if (e == NULL ? strchr(s, '.') == NULL : (strlen(e) < 4 || (e[1] != '+' && e[1] != '-')))
            fail("layout", v, s);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char text[64];
    uint64_t b;
    size_t i;

    if (size < 8) {
        memcpy(text, data, size);
        text[size] = '\0';
        check(strtod(text, NULL));
        return 0;
    }
    for (i = 0; i + 8 <= size; i += 8) {
        memcpy(&b, data + i, 8);
        {
            double d;
            memcpy(&d, &b, sizeof(d));
            check(d);
            check(nextafter(d, 0));
        }
    }
    return 0;
}

#include "pt_replay.h"
