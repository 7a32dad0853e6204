/* mlu_test.h: a tiny test harness for the pure-C core (no Python). */
#ifndef MLU_TEST_H
#define MLU_TEST_H
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int mlu_test_failures = 0;
static int mlu_test_checks = 0;

#define CHECK(cond)                                                              \
    do {                                                                         \
        mlu_test_checks++;                                                       \
        if (!(cond)) {                                                           \
            mlu_test_failures++;                                                 \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
        }                                                                        \
    } while (0)

/* xorshift64: the randomised tests' fixed-seed generator (a run is reproducible). */
static inline uint64_t mlu_test_rand(uint64_t *state)
{
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    return *state;
}

#define CHECK_STR(a, b) CHECK(strcmp((a), (b)) == 0)

/* Prints the plain closing line and returns the exit status. */
#define TEST_DONE(name)                                                           \
    (printf("%s: %d passed, %d failed\n", (name), mlu_test_checks - mlu_test_failures, \
            mlu_test_failures),                                                   \
     mlu_test_failures ? 1 : 0)
#endif
