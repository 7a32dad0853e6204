/* dtoa.c: shortest round-trip double -> text, laid out as Python's repr.
 *
 * The digits come from the Schubfach algorithm as the paper describes it
 * (R. Giulietti, "The Schubfach way to render doubles", 2020):
 *
 *  - a finite v > 0 is c * 2^q (c integer); every real in its rounding
 *    interval R = [c - 1/2, c + 1/2] * 2^q (the lower end is c - 1/4 when c
 *    is a power of two above the smallest binade; the ends belong to R when
 *    c is even) reads back as v;
 *  - with k = floor(log10(2^q)) (floor(log10(3/4 * 2^q)) for the narrow
 *    case) R scaled by 10^-k is between 1 and 10 wide, so it holds one or two
 *    integers and at most one multiple of ten: a multiple of ten in it gives
 *    the shortest digits (trailing zeros removed afterwards); otherwise the
 *    shortest need the 10^k digit and the answer is floor or floor + 1 of
 *    v * 10^-k, whichever lies in R, the nearer (ties to even) when both do;
 *  - the scaled values are computed, times 4, as g * cp / 2^127 "rounded to
 *    odd" (the floor, with the low bit set when inexact), where g is 10^-k
 *    rounded up to 126 bits (dtoa_table.h); the paper proves that this keeps
 *    every comparison above exact for doubles.
 *
 * dtoa_table.h is written by scripts/gen_dtoa_table.py (exact integers). */
#include "dtoa.h"

#include <string.h>

#include "dtoa_table.h"

__extension__ typedef unsigned __int128 u128;

#define C_MIN ((uint64_t)1 << 52) /* hidden bit */
#define Q_MIN (-1074)

/* floor(log10(2^q)), floor(log10(3/4 * 2^q)), floor(log2(10^e)) over the
 * ranges used here (checked exactly by scripts/gen_dtoa_table.py).  The
 * right shifts of negative values are arithmetic on every compiler we build
 * with (gcc, clang). */
static inline int flog10pow2(int q)
{
    return (int)(((int64_t)q * 661971961083LL) >> 41);
}

static inline int flog10three_quarters_pow2(int q)
{
    return (int)(((int64_t)q * 661971961083LL - 274743187321LL) >> 41);
}

static inline int flog2pow10(int e)
{
    return (int)(((int64_t)e * 913124641741LL) >> 38);
}

/* g * cp / 2^127 rounded to odd; g = {hi, lo} < 2^126, cp < 2^61. */
static inline uint64_t rop(const uint64_t g[2], uint64_t cp)
{
    u128 x = ((u128)g[1] * cp) >> 64;
    u128 y = (u128)g[0] * cp + x; /* floor(g * cp / 2^64), below 2^124 */
    uint64_t vbp = (uint64_t)(y >> 63);
    uint64_t frac = (uint64_t)y & (((uint64_t)1 << 63) - 1);
    return vbp | (frac != 0);
}

static inline uint64_t strip_zeros(uint64_t f, int *e)
{
    if (f == 0)
        return 0;
    while (f % 100000000u == 0) {
        f /= 100000000u;
        *e += 8;
    }
    if (f % 10000u == 0) {
        f /= 10000u;
        *e += 4;
    }
    if (f % 100u == 0) {
        f /= 100u;
        *e += 2;
    }
    if (f % 10u == 0) {
        f /= 10u;
        *e += 1;
    }
    return f;
}

/* The shortest digits of c * 2^q (c > 0): f * 10^e, no trailing zeros. */
static void schubfach(uint64_t c, int q, uint64_t *digits, int *exp10)
{
    uint64_t out = c & 1, cb = c << 2, cbr = cb + 2, cbl, vb, vbl, vbr, s, t, sp10, tp10, f;
    const uint64_t *g;
    int k, h, upin, wpin, uin, win;
    int64_t cmp;

    if (c != C_MIN || q == Q_MIN) {
        cbl = cb - 2;
        k = flog10pow2(q);
    } else {
        cbl = cb - 1;
        k = flog10three_quarters_pow2(q);
    }
    h = q + flog2pow10(-k) + 2; /* 2..5 */
    g = mlu_dtoa_g[k - MLU_DTOA_K_MIN];
    vb = rop(g, cb << h);
    vbl = rop(g, cbl << h);
    vbr = rop(g, cbr << h);
    s = vb >> 2;
    sp10 = s / 10 * 10;
    tp10 = sp10 + 10;
    upin = vbl + out <= sp10 << 2;
    wpin = (tp10 << 2) + out <= vbr;
    if (upin != wpin) {
        f = upin ? sp10 : tp10;
    } else {
        t = s + 1;
        uin = vbl + out <= s << 2;
        win = (t << 2) + out <= vbr;
        if (uin != win) {
            f = uin ? s : t;
        } else {
            cmp = (int64_t)(vb - ((s + t) << 1));
            f = (cmp < 0 || (cmp == 0 && (s & 1) == 0)) ? s : t;
        }
    }
    *exp10 = k;
    *digits = strip_zeros(f, exp10);
}

void mlu_dtoa_shortest(double v, uint64_t *digits, int *exp10)
{
    uint64_t bits, frac;
    int be;

    memcpy(&bits, &v, sizeof(bits));
    frac = bits & (C_MIN - 1);
    be = (int)((bits >> 52) & 0x7FF);
    *digits = 0;
    *exp10 = 0;
    if (be == 0x7FF || (be == 0 && frac == 0))
        return;
    if (be == 0)
        schubfach(frac, Q_MIN, digits, exp10);
    else
        schubfach(frac | C_MIN, be - 1075, digits, exp10);
}

static const char two_digits[201] =
    "00010203040506070809101112131415161718192021222324252627282930313233343536373839"
    "40414243444546474849505152535455565758596061626364656667686970717273747576777879"
    "8081828384858687888990919293949596979899";

/* Writes the n decimal digits of f (n = its digit count) at p. */
static void put_digits(char *p, uint64_t f, int n)
{
    char *q = p + n;
    while (f >= 100) {
        q -= 2;
        memcpy(q, two_digits + 2 * (f % 100), 2);
        f /= 100;
    }
    if (f >= 10) {
        q -= 2;
        memcpy(q, two_digits + 2 * f, 2);
    } else {
        *--q = (char)('0' + f);
    }
}

static int count_digits(uint64_t f)
{
    int n = 1;
    while (f >= 10000) {
        f /= 10000;
        n += 4;
    }
    while (f >= 10) {
        f /= 10;
        n++;
    }
    return n;
}

size_t mlu_dtoa(double v, char *out)
{
    uint64_t bits, f;
    char *p = out;
    int e, n, x, i;

    memcpy(&bits, &v, sizeof(bits));
    if (bits >> 63)
        *p++ = '-';
    if (((bits >> 52) & 0x7FF) == 0x7FF) {
        if (bits & (C_MIN - 1))
            p = out; /* repr(nan) has no sign */
        memcpy(p, (bits & (C_MIN - 1)) ? "nan" : "inf", 4);
        return (size_t)(p - out) + 3;
    }
    if ((bits << 1) == 0) {
        memcpy(p, "0.0", 4);
        return (size_t)(p - out) + 3;
    }
    mlu_dtoa_shortest(v, &f, &e);
    n = count_digits(f);
    x = e + n - 1; /* exponent of the first digit */
    if (x >= -4 && x < 16) {
        if (x < 0) { /* 0.000ddd */
            memcpy(p, "0.000", 2 + (size_t)(-x - 1));
            p += 2 + (-x - 1);
            put_digits(p, f, n);
            p += n;
        } else if (n <= x + 1) { /* ddd000.0 */
            put_digits(p, f, n);
            p += n;
            for (i = n; i <= x; i++)
                *p++ = '0';
            memcpy(p, ".0", 2);
            p += 2;
        } else { /* ddd.ddd */
            put_digits(p + 1, f, n);
            memmove(p, p + 1, (size_t)x + 1);
            p[x + 1] = '.';
            p += n + 1;
        }
    } else { /* d.ddde+XX */
        put_digits(p + 1, f, n);
        p[0] = p[1];
        if (n > 1) {
            p[1] = '.';
            p += n + 1;
        } else {
            p += 1;
        }
        *p++ = 'e';
        *p++ = x < 0 ? '-' : '+';
        if (x < 0)
            x = -x;
        if (x >= 100) {
            *p++ = (char)('0' + x / 100);
            x %= 100;
        }
        memcpy(p, two_digits + 2 * x, 2);
        p += 2;
    }
    *p = '\0';
    return (size_t)(p - out);
}
