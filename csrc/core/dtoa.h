/* dtoa.h: shortest round-trip formatting of doubles, as Python's repr(float).
 *
 * The digits are the shortest that read back (strtod, round-half-even) to the
 * same double, the closest to it when several are that short (ties to even);
 * they come from the Schubfach algorithm (R. Giulietti, "The Schubfach way to
 * render doubles", 2020), see dtoa.c.  The layout is repr's: fixed notation
 * when the decimal exponent x of the first digit is in -4 <= x < 16 (".0"
 * added to integral values), otherwise d[.ddd]e+XX / e-XX with at least two
 * exponent digits; "-0.0"; "nan", "inf", "-inf" for the non-finite values. */
#ifndef MLU_DTOA_H
#define MLU_DTOA_H

#include <stddef.h>
#include <stdint.h>

/* Enough for any output ("-2.2250738585072014e-308" is 24) plus a NUL. */
#define MLU_DTOA_BUFSIZE 32

/* Writes repr(v) into out (NUL-terminated) and returns its length. */
size_t mlu_dtoa(double v, char *out);

/* The shortest decimal of a finite v > 0 (or 0): v ~ digits * 10^exp10,
 * digits without trailing zeros (0 for 0.0).  For the tests. */
void mlu_dtoa_shortest(double v, uint64_t *digits, int *exp10);

#endif
