/*
 * memfill - guest memory pattern writer/checker for the cprctl test guest.
 *
 * Usage: memfill N        (N = MiB, N > 0)
 *
 * Allocates N MiB, fills every 8-byte word i with pattern(i) (splitmix64 of
 * the word index: deterministic, non-zero in practice, incompressible), then
 * every 3 seconds re-reads the whole region and checks it.
 *
 * Output (stdout, line buffered; /init points stdout at /dev/console):
 *   mem filled N MiB
 *   mem ok N MiB pass=K              (K = 1, 2, ...)
 *   mem BAD N MiB at offset=X        (X = byte offset, decimal; exit 1)
 *   mem alloc failed N MiB ...       (N + 8 MiB > MemAvailable; exit 2)
 *
 * Build: gcc -O2 -static -o memfill memfill.c
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* splitmix64 finaliser: a strong 64-bit mix of the word index. */
static inline uint64_t pattern(uint64_t i)
{
    uint64_t z = i + 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* MemAvailable from /proc/meminfo in MiB, or -1 if unknown. */
static long mem_available_mib(void)
{
    char line[128];
    long kib = -1;
    FILE *f = fopen("/proc/meminfo", "r");

    if (!f)
        return -1;
    while (fgets(line, sizeof(line), f))
        if (sscanf(line, "MemAvailable: %ld kB", &kib) == 1)
            break;
    fclose(f);
    return kib < 0 ? -1 : kib / 1024;
}

int main(int argc, char **argv)
{
    char *end;
    unsigned long mib;
    size_t words, i;
    uint64_t *p;
    unsigned long pass;
    long avail;

    setvbuf(stdout, NULL, _IOLBF, 0);
    setvbuf(stderr, NULL, _IONBF, 0);

    if (argc != 2) {
        fprintf(stderr, "usage: memfill MIB\n");
        return 2;
    }
    errno = 0;
    mib = strtoul(argv[1], &end, 10);
    if (errno || *end || mib == 0 || mib > (1UL << 20)) {
        fprintf(stderr, "memfill: bad size '%s'\n", argv[1]);
        return 2;
    }

    /* With overcommit, a too large malloc "succeeds" and the OOM killer
     * strikes silently later; refuse up front instead. */
    avail = mem_available_mib();
    if (avail >= 0 && mib + 8 > (unsigned long)avail) {
        printf("mem alloc failed %lu MiB (MemAvailable %ld MiB)\n", mib, avail);
        return 2;
    }

    words = (size_t)mib << 17;               /* MiB / 8 bytes per word */
    p = malloc(words * sizeof(*p));
    if (!p) {
        printf("mem alloc failed %lu MiB\n", mib);
        return 2;
    }

    /* Filling writes every word, hence touches (faults in) every page. */
    for (i = 0; i < words; i++)
        p[i] = pattern(i);
    printf("mem filled %lu MiB\n", mib);

    for (pass = 1;; pass++) {
        sleep(3);
        /* Make the compiler assume the region may have changed meanwhile,
         * so the check really re-reads memory. */
        __asm__ volatile("" : : "r"(p) : "memory");
        for (i = 0; i < words; i++) {
            if (p[i] != pattern(i)) {
                printf("mem BAD %lu MiB at offset=%zu\n", mib, i * sizeof(*p));
                printf("memfill: word %zu got=0x%016llx want=0x%016llx\n", i,
                       (unsigned long long)p[i],
                       (unsigned long long)pattern(i));
                return 1;
            }
        }
        printf("mem ok %lu MiB pass=%lu\n", mib, pass);
    }
}
