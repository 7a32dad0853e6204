/* ptsave_id.c: torch's serialization id (see ptsave_id.h). */
#include "ptsave_id.h"
#include "alloc.h"

#include <stdio.h>
#include <string.h>

static uint64_t shift_mix(uint64_t v)
{
    return v ^ (v >> 47);
}

uint64_t mlu_pt_string_hash(const void *p, size_t n)
{
    const uint64_t mul = ((uint64_t)0xc6a4a793u << 32) + 0x5bd1e995u;
    const unsigned char *c = p;
    size_t aligned = n & ~(size_t)7, i;
    uint64_t h = 0xc70f6907u ^ ((uint64_t)n * mul);

    for (i = 0; i < aligned; i += 8) {
        uint64_t d = 0;
        int k;
        for (k = 7; k >= 0; k--)
            d = (d << 8) | c[i + (size_t)k];
        d = shift_mix(d * mul) * mul;
        h ^= d;
        h *= mul;
    }
    if (n & 7) {
        uint64_t d = 0;
        size_t k = n & 7;
        while (k-- > 0)
            d = (d << 8) | c[aligned + k];
        h ^= d;
        h *= mul;
    }
    h = shift_mix(h) * mul;
    return shift_mix(h);
}

uint64_t mlu_pt_hash_combine(uint64_t seed, uint64_t value)
{
    return seed ^ (value + 0x9e3779b9u + (seed << 6) + (seed >> 2));
}

/* The bucket counts a libstdc++ unordered_set passes through when filled one
 * element at a time (max load factor 1: it grows when the count reaches the
 * bucket count, to the next prime of its table at or above twice as many). */
static const uint64_t BUCKETS[] = {
    13, 29, 59, 127, 257, 541, 1109, 2357, 5087, 10273, 20753, 42043, 85229, 172933, 351061,
    712697, 1447153, 2938679, 5967347, 12117689, 24607243, 49969847, 101473717, 206062531,
    418451333, 849749479, 1725587117,
};
#define N_BUCKETS (sizeof(BUCKETS) / sizeof(BUCKETS[0]))
#define EMPTY (-2)
#define BEFORE_BEGIN (-1)

typedef struct uset {
    const uint64_t *hash;  /* borrowed: one per node */
    int64_t *next;         /* owned: the singly linked node list, -1 ends it */
    int64_t head;          /* before_begin.next */
    int64_t *before;       /* owned: per bucket, the node before its first (BEFORE_BEGIN) or EMPTY */
    uint64_t nb;
} uset;

static int64_t *link_of(uset *s, int64_t prev)
{
    return prev == BEFORE_BEGIN ? &s->head : &s->next[prev];
}

/* _M_rehash_aux for unique keys. */
static mlu_status rehash(uset *s, uint64_t nb, mlu_error *err)
{
    int64_t *nbk = mlu_malloc((size_t)nb * sizeof(int64_t)), p, bbegin = -1;
    uint64_t i;

    if (nbk == NULL)
        return mlu_error_set(err, MLU_ENOMEM, -1, "out of memory");
    for (i = 0; i < nb; i++)
        nbk[i] = EMPTY;
    p = s->head;
    s->head = -1;
    while (p >= 0) {
        int64_t nx = s->next[p];
        uint64_t b = s->hash[p] % nb;
        if (nbk[b] == EMPTY) {
            s->next[p] = s->head;
            s->head = p;
            nbk[b] = BEFORE_BEGIN;
            if (s->next[p] >= 0)
                nbk[bbegin] = p;
            bbegin = (int64_t)b;
        } else {
            int64_t *l = link_of(s, nbk[b]);
            s->next[p] = *l;
            *l = p;
        }
        p = nx;
    }
    mlu_free(s->before);
    s->before = nbk;
    s->nb = nb;
    return MLU_OK;
}

mlu_status mlu_pt_serialization_id(const char *const *names, const uint32_t *crcs,
                                   const uint64_t *sizes, size_t n, char out[41], mlu_error *err)
{
    mlu_status st = MLU_ENOMEM;
    uint64_t *hash = NULL, names_h = 0, crc_h = 0;
    uset s = {NULL, NULL, -1, NULL, 1};
    size_t i, level = 0;
    int64_t p;

    if (n >= BUCKETS[N_BUCKETS - 1]) {
        st = mlu_error_set(err, MLU_ENOTSUP, -1, "too many records for a serialization id");
        goto done;
    }
    hash = mlu_malloc((n ? n : 1) * sizeof(uint64_t));
    s.next = mlu_malloc((n ? n : 1) * sizeof(int64_t));
    if (hash == NULL || s.next == NULL) {
        st = mlu_error_set(err, MLU_ENOMEM, -1, "out of memory");
        goto done;
    }
    s.hash = hash;
    for (i = 0; i < n; i++) {
        uint64_t b;
        hash[i] = mlu_pt_string_hash(names[i], strlen(names[i]));
        if (i == 0 || (uint64_t)i == s.nb) {
            st = rehash(&s, BUCKETS[i == 0 ? 0 : ++level], err);
            if (st != MLU_OK)
                goto done;
        }
        /* _M_insert_bucket_begin */
        b = hash[i] % s.nb;
        if (s.before[b] != EMPTY) {
            int64_t *l = link_of(&s, s.before[b]);
            s.next[i] = *l;
            *l = (int64_t)i;
        } else {
            s.next[i] = s.head;
            s.head = (int64_t)i;
            if (s.next[i] >= 0)
                s.before[hash[s.next[i]] % s.nb] = (int64_t)i;
            s.before[b] = BEFORE_BEGIN;
        }
        if (sizes[i] > 0)
            crc_h = mlu_pt_hash_combine(crc_h, crcs[i]);
    }
    for (p = s.head; p >= 0; p = s.next[p])
        names_h = mlu_pt_hash_combine(names_h, hash[p]);
    snprintf(out, 41, "%020llu%020llu", (unsigned long long)names_h, (unsigned long long)crc_h);
    st = MLU_OK;
done:
    mlu_free(hash);
    mlu_free(s.next);
    mlu_free(s.before);
    return st;
}
