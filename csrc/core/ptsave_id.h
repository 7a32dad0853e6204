/* ptsave_id.h: the `.data/serialization_id` record torch.save writes last.
 *
 * It is 40 ASCII digits: a 20-digit combination of the record names' hashes
 * followed by a 20-digit combination of the records' CRCs.  torch keeps the
 * names in a C++ std::unordered_set<std::string> and combines them in that
 * set's iteration order, so reproducing it means reproducing libstdc++'s
 * string hash (its _Hash_bytes, seed 0xc70f6907), its bucket growth and its
 * node order; c10::hash_combine does the combining.  This is what torch
 * built with libstdc++ (Linux wheels) writes. */
#ifndef MLU_PTSAVE_ID_H
#define MLU_PTSAVE_ID_H

#include "../mlu.h"

/* libstdc++'s std::hash<std::string> on 64-bit targets. */
uint64_t mlu_pt_string_hash(const void *p, size_t n);
/* c10::hash_combine. */
uint64_t mlu_pt_hash_combine(uint64_t seed, uint64_t value);

/* The id for records names[0..n) (without the archive prefix), in write
 * order, with their CRCs and sizes (empty records add no CRC).  out gets 40
 * digits and a NUL.  MLU_ENOTSUP when n is past the bucket counts this knows
 * (over a billion records). */
mlu_status mlu_pt_serialization_id(const char *const *names, const uint32_t *crcs,
                                   const uint64_t *sizes, size_t n, char out[41], mlu_error *err);

#endif
