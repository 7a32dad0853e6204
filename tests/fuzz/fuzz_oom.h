/* fuzz_oom.h: a second pass of a fuzz input with one core allocation failing.
 *
 * FUZZ_WITH_OOM(run, data, size) calls run(data, size, 1) with allocations
 * working and counts them; then, when there were any, calls
 * run(data, size, 0) with the kth allocation (and every later one) failing,
 * k picked from the input's bytes.  So the fuzzer also walks the
 * out-of-memory paths, and LeakSanitizer checks that they free everything.
 * run's last argument says whether allocations are reliable (only then may
 * it check results that an ENOMEM would change). */
#ifndef FUZZ_OOM_H
#define FUZZ_OOM_H

#include <stddef.h>
#include <stdint.h>

#include "core/alloc.h"

static inline long fuzz_oom_pick(const uint8_t *data, size_t size, long count)
{
    uint64_t h = 1469598103934665603ull;
    size_t i;
    for (i = 0; i < size; i++)
        h = (h ^ data[i]) * 1099511628211ull;
    return (long)(h % (uint64_t)count);
}

#define FUZZ_WITH_OOM(run, data, size)                                  \
    do {                                                                \
        long count_;                                                    \
        mlu_alloc_fail_after(-1);                                       \
        run((data), (size), 1);                                         \
        count_ = mlu_alloc_count();                                     \
        if (count_ > 0) {                                               \
            mlu_alloc_fail_after(fuzz_oom_pick((data), (size), count_)); \
            run((data), (size), 0);                                     \
            mlu_alloc_fail_after(-1);                                   \
        }                                                               \
    } while (0)

#endif
