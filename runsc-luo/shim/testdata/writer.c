// writer appends records to a memfd with write(2) and writev(2), reads
// them back with pread(2) in one call, and checks every byte. Run under
// the shim while the sentry pauses and resumes over and over, it shows
// that calls the pauses interrupt are restarted with nothing lost and
// nothing written twice. It prints "ok" or a reason and exits 0 or 1.
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>

#define RECORDS 48
#define MAXREC (1 << 20)

static void fill(unsigned char *b, size_t n, unsigned rec)
{
	for (size_t i = 0; i < n; i++)
		b[i] = (unsigned char)(rec * 131 + i * 7 + (i >> 12));
}

int main(void)
{
	int fd = memfd_create("writer", 0);
	if (fd < 0) {
		perror("memfd_create");
		return 1;
	}
	size_t total = 0, sizes[RECORDS];
	unsigned char *rec = malloc(MAXREC);
	srand(7);
	for (unsigned r = 0; r < RECORDS; r++) {
		size_t n = MAXREC / 2 + (size_t)(rand() % (MAXREC / 2));
		sizes[r] = n;
		fill(rec, n, r);
		ssize_t w;
		if (r % 2) {
			struct iovec v[3] = {{rec, 100}, {rec + 100, n / 2 - 100}, {rec + n / 2, n - n / 2}};
			w = writev(fd, v, 3);
		} else {
			w = write(fd, rec, n);
		}
		if (w != (ssize_t)n) {
			printf("record %u: wrote %zd of %zu bytes (%s)\n", r, w, n, w < 0 ? strerror(errno) : "short");
			return 1;
		}
		total += n;
	}
	unsigned char *all = malloc(total + 1);
	ssize_t got = pread(fd, all, total + 1, 0);
	if (got != (ssize_t)total) {
		printf("pread: %zd bytes, %zu written\n", got, total);
		return 1;
	}
	size_t off = 0;
	for (unsigned r = 0; r < RECORDS; r++) {
		fill(rec, sizes[r], r);
		if (memcmp(all + off, rec, sizes[r]) != 0) {
			printf("record %u at %zu differs\n", r, off);
			return 1;
		}
		off += sizes[r];
	}
	printf("ok\n");
	return 0;
}
