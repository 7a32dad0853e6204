/* pt_replay.h: a replay main for the ptload fuzz harnesses, so gcc + ASan can
 * run a seed corpus without libFuzzer: each argument is a file or a directory
 * of files, each fed once to LLVMFuzzerTestOneInput.  With PT_MUTATE=N in the
 * environment each input is also fed N deterministic mutations (byte flips,
 * overwrites with boundary values, truncations, duplicated spans). */
#ifndef PT_REPLAY_H
#define PT_REPLAY_H
#ifndef MLU_LIBFUZZER
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint64_t rnd(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

static void mutate_runs(const uint8_t *src, size_t n)
{
    const char *env = getenv("PT_MUTATE");
    long runs = env ? atol(env) : 0, r;
    static const uint8_t special[] = {0x00, 0xFF, 0x7F, 0x80, 0x01, 0xFE, 'P', 'K', '.', 'R', 'b', 's', 'u', 'e'};
    uint8_t *m;
    if (runs <= 0 || n == 0)
        return;
    m = malloc(n * 2 + 16);
    if (m == NULL)
        return;
    for (r = 0; r < runs; r++) {
        size_t len = n, k, edits = 1 + rnd() % 4;
        memcpy(m, src, n);
        for (k = 0; k < edits; k++) {
            size_t at = rnd() % len;
            switch (rnd() % 6) {
            case 0: m[at] ^= (uint8_t)(1u << (rnd() % 8)); break;
            case 1: m[at] = special[rnd() % sizeof(special)]; break;
            case 2: if (at + 4 <= len) { uint32_t v = rnd() % 3 == 0 ? 0xFFFFFFFFu : (uint32_t)(rnd() % 4096); memcpy(m + at, &v, 4); } break;
            case 3: len = at + 1; break;
            case 4: { size_t span = 1 + rnd() % 16; if (at + span <= len && len + span <= n * 2 + 16) { memmove(m + at + span, m + at, len - at); len += span; } } break;
            default: m[at] = (uint8_t)rnd(); break;
            }
        }
        LLVMFuzzerTestOneInput(m, len);
    }
    free(m);
}

static int replay_file(const char *path)
{
    FILE *f = fopen(path, "rb");
    long n;
    uint8_t *buf;
    if (f == NULL)
        return -1;
    if (fseek(f, 0, SEEK_END) != 0 || (n = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0) {
        fclose(f);
        return -1;
    }
    buf = malloc(n > 0 ? (size_t)n : 1);
    if (buf == NULL || fread(buf, 1, (size_t)n, f) != (size_t)n) {
        free(buf);
        fclose(f);
        return -1;
    }
    fclose(f);
    LLVMFuzzerTestOneInput(buf, (size_t)n);
    mutate_runs(buf, (size_t)n);
    free(buf);
    return 0;
}

int main(int argc, char **argv)
{
    int i, count = 0;
    for (i = 1; i < argc; i++) {
        struct stat sb;
        if (stat(argv[i], &sb) != 0)
            return 2;
        if (S_ISDIR(sb.st_mode)) {
            DIR *d = opendir(argv[i]);
            struct dirent *e;
            char p[4096];
            if (d == NULL)
                return 2;
            while ((e = readdir(d)) != NULL) {
                if (e->d_name[0] == '.')
                    continue;
                snprintf(p, sizeof(p), "%s/%s", argv[i], e->d_name);
                if (replay_file(p) != 0)
                    return 2;
                count++;
            }
            closedir(d);
        } else {
            if (replay_file(argv[i]) != 0)
                return 2;
            count++;
        }
    }
    printf("replayed %d inputs\n", count);
    return 0;
}
#endif
#endif
