/* test_dtoa.c: mlu_dtoa against the C library: every output reads back
 * (strtod) to the same bits, no shorter decimal does, the digits are the
 * correctly rounded ones of that length (printf "%.*e", exact in glibc), and
 * the layout is repr's. */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/dtoa.h"
#include "mlu_test.h"

static uint64_t bits_of(double d)
{
    uint64_t b;
    memcpy(&b, &d, sizeof(b));
    return b;
}

static double of_bits(uint64_t b)
{
    double d;
    memcpy(&d, &b, sizeof(d));
    return d;
}

/* Significant digits of a "%.Ne" / our text (no sign, no dot, no exponent,
 * no leading zeros, no trailing zeros). */
static void sig_digits(const char *s, char *out)
{
    char *o = out;
    int started = 0;
    for (; *s && *s != 'e' && *s != 'E'; s++) {
        if (*s < '0' || *s > '9')
            continue;
        if (*s == '0' && !started)
            continue;
        started = 1;
        *o++ = *s;
    }
    while (o > out && o[-1] == '0')
        o--;
    *o = '\0';
}

static int checked = 0, failed = 0;

/* One double: round trip, shortest, nearest, layout. */
static void check_one(double v)
{
    char s[MLU_DTOA_BUFSIZE], ref[64], dig[40], refdig[40];
    size_t n = mlu_dtoa(v, s);
    int nd, ok = 1;
    const char *e;

    checked++;
    if (n != strlen(s) || n >= MLU_DTOA_BUFSIZE)
        ok = 0;
    if (bits_of(strtod(s, NULL)) != bits_of(v))
        ok = 0; /* round trip */
    sig_digits(s, dig);
    nd = (int)strlen(dig);
    if (v != 0) {
        /* the nearest nd-digit decimal must be ours when it reads back (at
         * a power of two the interval is lopsided and it may not) */
        snprintf(ref, sizeof(ref), "%.*e", nd - 1, v);
        sig_digits(ref, refdig);
        if (bits_of(strtod(ref, NULL)) == bits_of(v) && strcmp(refdig, dig) != 0)
            ok = 0;
        /* no (nd-1)-digit decimal reads back as v: the nearest one of that
         * length, and the next one up and down, all miss */
        if (nd > 1) {
            double r = strtod((snprintf(ref, sizeof(ref), "%.*e", nd - 2, v), ref), NULL);
            if (bits_of(r) == bits_of(v))
                ok = 0;
        }
    }
    /* layout: exponent form exactly outside -4 <= x < 16, two+ exponent digits */
    e = strchr(s, 'e');
    if (v != 0 && isfinite(v)) {
        int x;
        snprintf(ref, sizeof(ref), "%.*e", nd - 1, v);
        x = atoi(strchr(ref, 'e') + 1);
        if ((e != NULL) != (x < -4 || x >= 16))
            ok = 0;
        if (e != NULL && (strlen(e) < 4 || (e[1] != '+' && e[1] != '-')))
            ok = 0;
        if (e == NULL && strchr(s, '.') == NULL)
            ok = 0;
    }
    if (!ok) {
        failed++;
        if (failed < 20)
            fprintf(stderr, "dtoa wrong for %a (%.17g): %s\n", v, v, s);
    }
}

static void check_with_neighbours(double v)
{
    check_one(v);
    check_one(-v);
    check_one(nextafter(v, INFINITY));
    check_one(nextafter(v, 0));
    check_one(nextafter(nextafter(v, INFINITY), INFINITY));
    check_one(nextafter(nextafter(v, 0), 0));
}

static void expect(double v, const char *want)
{
    char s[MLU_DTOA_BUFSIZE];
    mlu_dtoa(v, s);
    CHECK_STR(s, want);
    if (strcmp(s, want) != 0)
        fprintf(stderr, "  %a: got %s, want %s\n", v, s, want);
}

int main(void)
{
    uint64_t x = 0x243F6A8885A308D3ull, c;
    int i;
    char buf[64];

    /* repr's text, literally */
    expect(0.0, "0.0");
    expect(-0.0, "-0.0");
    expect(1.0, "1.0");
    expect(-2.5, "-2.5");
    expect(0.1, "0.1");
    expect(0.3, "0.3");
    expect(0.1 + 0.2, "0.30000000000000004");
    expect(1.0 / 3, "0.3333333333333333");
    expect(2.0 / 3, "0.6666666666666666");
    expect(5e-324, "5e-324");
    expect(1e-323, "1e-323");
    expect(2.225073858507201e-308, "2.225073858507201e-308"); /* max subnormal */
    expect(DBL_MIN, "2.2250738585072014e-308");
    expect(DBL_MAX, "1.7976931348623157e+308");
    expect(9007199254740993.0, "9007199254740992.0");
    expect(9007199254740994.0, "9007199254740994.0");
    expect(1e16, "1e+16");
    expect(1e15, "1000000000000000.0");
    expect(1234567890123456.0, "1234567890123456.0");
    expect(12345678901234567.0, "1.2345678901234568e+16");
    expect(9999999999999998.0, "9999999999999998.0");
    expect(0.0001, "0.0001");
    expect(0.00001, "1e-05");
    expect(0.00012345, "0.00012345");
    expect(1.5e300, "1.5e+300");
    expect(1e100, "1e+100");
    expect(1e-100, "1e-100");
    expect(123.456, "123.456");
    expect(1e22, "1e+22");
    expect(1e23, "1e+23");
    expect(5e-5, "5e-05");
    expect(NAN, "nan");
    expect(INFINITY, "inf");
    expect(-INFINITY, "-inf");

    /* edge values and their neighbours */
    check_with_neighbours(5e-324);
    check_with_neighbours(2.225073858507201e-308);
    check_with_neighbours(DBL_MIN);
    check_with_neighbours(DBL_MAX);
    check_with_neighbours(9007199254740993.0);
    check_with_neighbours(0.1);
    check_with_neighbours(0.3);
    check_with_neighbours(1.0 / 3);
    check_with_neighbours(1e-5);
    check_with_neighbours(1e-4);
    check_with_neighbours(1e15);
    check_with_neighbours(1e16);
    /* every power of ten and of two in range, with neighbours */
    for (i = -323; i <= 308; i++) {
        snprintf(buf, sizeof(buf), "1e%d", i);
        check_with_neighbours(strtod(buf, NULL));
    }
    for (i = -1074; i <= 1023; i++)
        check_with_neighbours(ldexp(1.0, i));
    /* the smallest subnormals and each binade's first and last values */
    for (c = 1; c < 5000; c++)
        check_one(of_bits(c));
    for (c = 1; c < 2047; c++) {
        check_one(of_bits(c << 52));
        check_one(of_bits((c << 52) - 1));
        check_one(of_bits((c << 52) + 1));
    }
    /* random bit patterns */
    for (i = 0; i < 300000; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if (((x >> 52) & 0x7FF) != 0x7FF)
            check_one(of_bits(x));
    }
    CHECK(failed == 0);
    printf("dtoa: %d doubles checked against strtod/printf\n", checked);
    return TEST_DONE("test_dtoa");
}
