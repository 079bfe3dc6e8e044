/* One life of an entrypoint that is restarted again and again: it says
 * whether the previous life is gone (reaped, not even a zombie) when its
 * own code starts, then holds a touched anonymous mapping (so that its
 * own teardown takes a while) and a memfd (so that it is connected to the
 * sentry, whose Hello says it waits at a start gate), and waits to be
 * killed by the next restart.
 *
 * argv[1] is a file holding the pid of the life before, if any. */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: lives PIDFILE\n");
		return 2;
	}
	const char *gen = getenv("LIVESENTRY_LIVEUPDATE_NUMBER");
	FILE *f = fopen(argv[1], "r");
	int prev = 0;
	if (f != NULL) {
		if (fscanf(f, "%d", &prev) != 1)
			prev = 0;
		fclose(f);
	}
	if (prev > 0) {
		/* kill(2) with signal 0 finds a zombie too. */
		if (kill(prev, 0) == 0)
			printf("not ok: life %s runs while the life before (pid %d) is still there\n", gen, prev);
		else if (errno == ESRCH)
			printf("ok: life %s, the life before (pid %d) is gone\n", gen, prev);
		else
			printf("not ok: life %s: kill(%d, 0): %s\n", gen, prev, strerror(errno));
	} else {
		printf("ok: life %s, the first\n", gen);
	}
	fflush(stdout);
	f = fopen(argv[1], "w");
	if (f == NULL || fprintf(f, "%d\n", getpid()) < 0 || fclose(f) != 0) {
		perror("writing the pid file");
		return 1;
	}
	int m = memfd_create("lives", MFD_CLOEXEC);
	if (m < 0) {
		perror("memfd_create");
		return 1;
	}
	size_t size = 128 << 20;
	char *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED) {
		perror("mmap");
		return 1;
	}
	memset(p, 1, size);
	printf("holding: life %s\n", gen);
	fflush(stdout);
	for (;;)
		pause();
}
