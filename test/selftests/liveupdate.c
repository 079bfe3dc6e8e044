/* /dev/liveupdate: the device, sessions and preservation of memfds within
 * one life of the sandbox (no live update). Each case is what a program
 * sees through the uapi alone. */
#include "lu.h"
#include "tap.h"

static int open_dev(void)
{
	int fd = open(LIVEUPDATE_DEV, O_RDWR);
	if (fd < 0 && errno == ENOENT)
		SKIP("%s does not exist", LIVEUPDATE_DEV);
	ASSERT_GE(fd, 0);
	return fd;
}

/* The device opens and closes. */
TEST(basic_open_close)
{
	int fd = open_dev();
	ASSERT_EQ(close(fd), 0);
}

/* A second open while the first is open is EBUSY; after the close it
 * opens again. */
TEST(exclusive_open)
{
	int fd = open_dev();
	errno = 0;
	EXPECT_EQ(open(LIVEUPDATE_DEV, O_RDWR), -1);
	EXPECT_EQ(errno, EBUSY);
	ASSERT_EQ(close(fd), 0);
	fd = open_dev();
	ASSERT_EQ(close(fd), 0);
}

/* Two sessions of one name: the second is EEXIST. */
TEST(create_duplicate_session)
{
	int dev = open_dev();
	int s1 = lu_create_session(dev, "duplicate-session");
	ASSERT_GE(s1, 0);
	EXPECT_EQ(lu_create_session(dev, "duplicate-session"), -EEXIST);
	ASSERT_EQ(close(s1), 0);
	/* Closing the session frees its name. */
	s1 = lu_create_session(dev, "duplicate-session");
	ASSERT_GE(s1, 0);
	ASSERT_EQ(close(s1), 0);
}

/* Sessions of different names coexist, each with its own fd. */
TEST(create_distinct_sessions)
{
	int dev = open_dev();
	int s1 = lu_create_session(dev, "distinct-1");
	int s2 = lu_create_session(dev, "distinct-2");
	ASSERT_GE(s1, 0);
	ASSERT_GE(s2, 0);
	ASSERT_NE(s1, s2);
	char name[LIVEUPDATE_SESSION_NAME_LENGTH];
	ASSERT_EQ(lu_get_name(s2, name, sizeof(name)), 0);
	ASSERT_STREQ(name, "distinct-2");
	ASSERT_EQ(close(s1), 0);
	ASSERT_EQ(close(s2), 0);
}

/* A name filling all 64 bytes without a NUL is EINVAL; so is "". */
TEST(create_session_bad_names)
{
	int dev = open_dev();
	struct liveupdate_ioctl_create_session a = {.size = sizeof(a)};
	memset(a.name, 'X', sizeof(a.name));
	errno = 0;
	EXPECT_EQ(ioctl(dev, LIVEUPDATE_IOCTL_CREATE_SESSION, &a), -1);
	EXPECT_EQ(errno, EINVAL);
	EXPECT_EQ(lu_create_session(dev, ""), -EINVAL);
}

/* One memfd is preserved; its contents and position stay usable. */
TEST(preserve_memfd)
{
	const char *data = "hello liveupdate";
	char buf[64] = {0};
	int dev = open_dev();
	int s = lu_create_session(dev, "preserve-memfd");
	ASSERT_GE(s, 0);
	int m = lu_memfd_with("one", data);
	ASSERT_GE(m, 0);
	ASSERT_EQ(lu_preserve_fd(s, m, 0x1234), 0);
	ASSERT_EQ(close(s), 0);
	ASSERT_EQ(lseek(m, 0, SEEK_SET), 0);
	ASSERT_EQ(read(m, buf, sizeof(buf)), (long)strlen(data));
	ASSERT_STREQ(buf, data);
	ASSERT_EQ(close(m), 0);
}

/* Two memfds in one session under two tokens keep distinct contents. */
TEST(preserve_multiple_memfds)
{
	int dev = open_dev();
	int s = lu_create_session(dev, "preserve-multi");
	ASSERT_GE(s, 0);
	int m1 = lu_memfd_with("one", "data for memfd one");
	int m2 = lu_memfd_with("two", "data for memfd two");
	ASSERT_GE(m1, 0);
	ASSERT_GE(m2, 0);
	ASSERT_EQ(lu_preserve_fd(s, m1, 0xAAAA), 0);
	ASSERT_EQ(lu_preserve_fd(s, m2, 0xBBBB), 0);
	/* A token is unique within its session. */
	int m3 = memfd_create("three", 0);
	ASSERT_GE(m3, 0);
	EXPECT_EQ(lu_preserve_fd(s, m3, 0xAAAA), -EEXIST);
	ASSERT_TRUE(lu_memfd_holds(m1, "data for memfd one"));
	ASSERT_TRUE(lu_memfd_holds(m2, "data for memfd two"));
	ASSERT_EQ(close(m1), 0);
	ASSERT_EQ(close(m2), 0);
	ASSERT_EQ(close(m3), 0);
	ASSERT_EQ(close(s), 0);
}

/* Two sessions, each with an empty memfd and one with data. */
TEST(preserve_complex_scenario)
{
	int dev = open_dev();
	int s1 = lu_create_session(dev, "complex-1");
	int s2 = lu_create_session(dev, "complex-2");
	ASSERT_GE(s1, 0);
	ASSERT_GE(s2, 0);
	int d1 = lu_memfd_with("data1", "data for session 1");
	int e1 = memfd_create("empty1", 0);
	int d2 = lu_memfd_with("data2", "data for session 2");
	int e2 = memfd_create("empty2", 0);
	ASSERT_GE(d1, 0);
	ASSERT_GE(e1, 0);
	ASSERT_GE(d2, 0);
	ASSERT_GE(e2, 0);
	ASSERT_EQ(lu_preserve_fd(s1, d1, 0x1111), 0);
	ASSERT_EQ(lu_preserve_fd(s1, e1, 0x2222), 0);
	ASSERT_EQ(lu_preserve_fd(s2, d2, 0x3333), 0);
	ASSERT_EQ(lu_preserve_fd(s2, e2, 0x4444), 0);
	ASSERT_TRUE(lu_memfd_holds(d1, "data for session 1"));
	ASSERT_TRUE(lu_memfd_holds(d2, "data for session 2"));
	ASSERT_TRUE(lu_memfd_holds(e1, ""));
	ASSERT_TRUE(lu_memfd_holds(e2, ""));
	ASSERT_EQ(close(s1), 0);
	ASSERT_EQ(close(s2), 0);
}

/* A file no handler can preserve (a host character device) is ENOENT; a
 * closed fd is EBADF. */
TEST(preserve_unsupported_fd)
{
	int dev = open_dev();
	int s = lu_create_session(dev, "unsupported");
	ASSERT_GE(s, 0);
	int null = open("/dev/null", O_RDWR);
	ASSERT_GE(null, 0);
	EXPECT_EQ(lu_preserve_fd(s, null, 0xDEAD), -ENOENT);
	/* The device itself has no handler either. */
	EXPECT_EQ(lu_preserve_fd(s, dev, 0xBEEF), -ENOENT);
	ASSERT_EQ(close(null), 0);
	EXPECT_EQ(lu_preserve_fd(s, null, 0xDEAD), -EBADF);
	ASSERT_EQ(close(s), 0);
}

/* A memfd is preserved once across all sessions: EBUSY after. */
TEST(prevent_double_preservation)
{
	int dev = open_dev();
	int s1 = lu_create_session(dev, "double-1");
	int s2 = lu_create_session(dev, "double-2");
	ASSERT_GE(s1, 0);
	ASSERT_GE(s2, 0);
	int m = memfd_create("m", 0);
	ASSERT_GE(m, 0);
	ASSERT_EQ(lu_preserve_fd(s1, m, 1), 0);
	EXPECT_EQ(lu_preserve_fd(s2, m, 2), -EBUSY);
	EXPECT_EQ(lu_preserve_fd(s1, m, 3), -EBUSY);
	/* dup'd fds name the same file. */
	int d = dup(m);
	ASSERT_GE(d, 0);
	EXPECT_EQ(lu_preserve_fd(s2, d, 4), -EBUSY);
	/* Closing the session unpreserves: the file can be preserved again. */
	ASSERT_EQ(close(s1), 0);
	EXPECT_EQ(lu_preserve_fd(s2, m, 5), 0);
	ASSERT_EQ(close(s2), 0);
}

/* 2000 sessions exist at once and all close. A sandbox process holds at
 * most 1024 sentry fds (the default RLIMIT_NOFILE, which a guest cannot
 * raise in the sentry), so two forked processes sharing the device hold
 * 1000 sessions each, both halves open at the same time. */
static void create_sessions(int dev, int first, int n, int *fds)
{
	for (int i = 0; i < n; i++) {
		char name[64];
		snprintf(name, sizeof(name), "many-session-%d", first + i);
		fds[i] = lu_create_session(dev, name);
		ASSERT_GE(fds[i], 0);
	}
}

TEST(preserve_many_sessions)
{
	enum { N = 2000, HALF = N / 2 };
	static int fds[HALF];
	int dev = open_dev();
	int r = lu_nofile(HALF + 64);
	if (r == -EPERM)
		SKIP("cannot raise RLIMIT_NOFILE");
	ASSERT_EQ(r, 0);
	int ready[2], done[2];
	ASSERT_EQ(pipe(ready), 0);
	ASSERT_EQ(pipe(done), 0);
	pid_t child = fork();
	ASSERT_GE(child, 0);
	if (child == 0) {
		create_sessions(dev, HALF, HALF, fds);
		ASSERT_EQ(write(ready[1], "r", 1), 1);
		char c;
		ASSERT_EQ(read(done[0], &c, 1), 1);
		for (int i = 0; i < HALF; i++)
			ASSERT_EQ(close(fds[i]), 0);
		exit(tap_failed);
	}
	char c;
	ASSERT_EQ(read(ready[0], &c, 1), 1);
	create_sessions(dev, 0, HALF, fds);
	/* All 2000 exist: every name is taken. */
	EXPECT_EQ(lu_create_session(dev, "many-session-0"), -EEXIST);
	EXPECT_EQ(lu_create_session(dev, "many-session-1999"), -EEXIST);
	ASSERT_EQ(write(done[1], "d", 1), 1);
	int st;
	ASSERT_EQ(waitpid(child, &st, 0), child);
	ASSERT_TRUE(WIFEXITED(st) && WEXITSTATUS(st) == 0);
	for (int i = 0; i < HALF; i++)
		ASSERT_EQ(close(fds[i]), 0);
	/* Closed sessions free their names. */
	int s = lu_create_session(dev, "many-session-1999");
	ASSERT_GE(s, 0);
	ASSERT_EQ(close(s), 0);
}

/* 500 memfds are preserved in one session. */
TEST(preserve_many_files)
{
	enum { N = 500 };
	int fds[N];
	int dev = open_dev();
	int s = lu_create_session(dev, "many-files");
	ASSERT_GE(s, 0);
	int r = lu_nofile(N + 64);
	if (r == -EPERM)
		SKIP("cannot raise RLIMIT_NOFILE");
	ASSERT_EQ(r, 0);
	for (int i = 0; i < N; i++) {
		fds[i] = memfd_create("many", 0);
		ASSERT_GE(fds[i], 0);
		ASSERT_EQ(lu_preserve_fd(s, fds[i], (uint64_t)i), 0);
	}
	for (int i = 0; i < N; i++)
		ASSERT_EQ(close(fds[i]), 0);
	ASSERT_EQ(close(s), 0);
}

int main(void) { return tap_main(); }
