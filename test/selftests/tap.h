/* A small kselftest-shaped harness: TEST(name) { ... } registers a case;
 * tap_main runs each in a forked child (so one case's crash, leaked fd or
 * open /dev/liveupdate cannot affect the next) and prints TAP:
 *
 *   TAP version 13
 *   1..N
 *   ok 1 name
 *   not ok 2 name
 *   ok 3 name # SKIP why
 *   # Totals: pass:P fail:F skip:S
 *
 * ASSERT_* end the case at the first failure; EXPECT_* record it and go on.
 * Messages go to stdout as TAP comments ("# ..."). tap_main returns 1 if any
 * case failed. */
#ifndef LIVESENTRY_SELFTESTS_TAP_H
#define LIVESENTRY_SELFTESTS_TAP_H

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define TAP_MAX_TESTS 128
#define TAP_SKIP_STATUS 4
#define TAP_TIMEOUT_SECONDS 120

struct tap_test {
	const char *name;
	void (*fn)(void);
};

static struct tap_test tap_tests[TAP_MAX_TESTS];
static int tap_ntests;
static int tap_failed;

#define TEST(name)                                                            \
	static void name(void);                                               \
	static void __attribute__((constructor)) tap_register_##name(void)    \
	{                                                                     \
		if (tap_ntests < TAP_MAX_TESTS)                               \
			tap_tests[tap_ntests++] = (struct tap_test){#name, name}; \
	}                                                                     \
	static void name(void)

#define TAP_MSG(...)                                                          \
	do {                                                                  \
		printf("# %s:%d: ", __FILE__, __LINE__);                      \
		printf(__VA_ARGS__);                                          \
		printf("\n");                                                 \
	} while (0)

#define TAP_CHECK(cond, fatal, ...)                                           \
	do {                                                                  \
		if (!(cond)) {                                                \
			TAP_MSG(__VA_ARGS__);                                 \
			tap_failed = 1;                                       \
			if (fatal)                                            \
				exit(1);                                      \
		}                                                             \
	} while (0)

#define TAP_CMP(a, op, b, fatal)                                              \
	do {                                                                  \
		long long tap_a_ = (long long)(a), tap_b_ = (long long)(b);  \
		TAP_CHECK(tap_a_ op tap_b_, fatal, "%s (%lld) " #op " %s (%lld) fails (errno %d: %s)", \
			  #a, tap_a_, #b, tap_b_, errno, strerror(errno)); \
	} while (0)

#define ASSERT_EQ(a, b) TAP_CMP(a, ==, b, 1)
#define ASSERT_NE(a, b) TAP_CMP(a, !=, b, 1)
#define ASSERT_GE(a, b) TAP_CMP(a, >=, b, 1)
#define ASSERT_LT(a, b) TAP_CMP(a, <, b, 1)
#define EXPECT_EQ(a, b) TAP_CMP(a, ==, b, 0)
#define EXPECT_NE(a, b) TAP_CMP(a, !=, b, 0)
#define EXPECT_LT(a, b) TAP_CMP(a, <, b, 0)
#define ASSERT_TRUE(c) TAP_CHECK(c, 1, "%s is false", #c)
#define ASSERT_STREQ(a, b) TAP_CHECK(strcmp((a), (b)) == 0, 1, "%s (\"%s\") != %s (\"%s\")", #a, (a), #b, (b))
#define ASSERT_MEMEQ(a, b, n) TAP_CHECK(memcmp((a), (b), (n)) == 0, 1, "%s and %s differ in their first %zu bytes", #a, #b, (size_t)(n))

/* SKIP ends the case as skipped. */
#define SKIP(...)                                                             \
	do {                                                                  \
		printf("# SKIP: ");                                           \
		printf(__VA_ARGS__);                                          \
		printf("\n");                                                 \
		exit(TAP_SKIP_STATUS);                                        \
	} while (0)

static inline int tap_main(void)
{
	int pass = 0, fail = 0, skip = 0;
	/* Cases count on fds 0-2 being taken (close_range(3, ...)). */
	int fd;
	while ((fd = open("/dev/null", O_RDWR)) >= 0 && fd < 3)
		;
	if (fd >= 3)
		close(fd);
	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("TAP version 13\n1..%d\n", tap_ntests);
	for (int i = 0; i < tap_ntests; i++) {
		fflush(stdout);
		pid_t pid = fork();
		if (pid < 0) {
			printf("not ok %d %s # fork: %s\n", i + 1, tap_tests[i].name, strerror(errno));
			fail++;
			continue;
		}
		if (pid == 0) {
			alarm(TAP_TIMEOUT_SECONDS);
			tap_tests[i].fn();
			exit(tap_failed ? 1 : 0);
		}
		int st;
		while (waitpid(pid, &st, 0) < 0 && errno == EINTR)
			;
		if (WIFEXITED(st) && WEXITSTATUS(st) == 0) {
			printf("ok %d %s\n", i + 1, tap_tests[i].name);
			pass++;
		} else if (WIFEXITED(st) && WEXITSTATUS(st) == TAP_SKIP_STATUS) {
			printf("ok %d %s # SKIP\n", i + 1, tap_tests[i].name);
			skip++;
		} else {
			if (WIFSIGNALED(st))
				printf("# %s: killed by signal %d\n", tap_tests[i].name, WTERMSIG(st));
			printf("not ok %d %s\n", i + 1, tap_tests[i].name);
			fail++;
		}
	}
	printf("# Totals: pass:%d fail:%d skip:%d\n", pass, fail, skip);
	return fail ? 1 : 0;
}

#endif
