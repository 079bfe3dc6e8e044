/* The libc shim's own behaviour, seen by a plain C program run as a guest:
 * fork, exec with and without FD_CLOEXEC, close_range, dup2 onto a
 * placeholder, and threads calling at once. The exec cases re-execute this
 * program with a stage name in argv[1]. */
#define _GNU_SOURCE
#include <linux/close_range.h>
#include <pthread.h>
#include <sys/stat.h>
#include <sys/uio.h>

#include "../selftests/lu.h"
#include "../selftests/tap.h"

static int open_dev(int flags)
{
	int fd = open(LIVEUPDATE_DEV, O_RDWR | flags);
	ASSERT_GE(fd, 0);
	return fd;
}

/* is_open reports whether host fd fd is open. */
static int is_open(int fd) { return fcntl(fd, F_GETFD) >= 0 || errno != EBADF; }

/* A forked child has the parent's sentry fds (same open files: a shared
 * offset) on a connection of its own: its calls run while the parent's
 * go on, and its close and exit leave the parent's fds alone. */
TEST(fork_child_has_the_fds_and_its_own_connection)
{
	int m = lu_memfd_with("forked", "parent data");
	ASSERT_GE(m, 0);
	int dev = open_dev(0);
	int go[2];
	ASSERT_EQ(pipe(go), 0);
	pid_t pid = fork();
	ASSERT_GE(pid, 0);
	if (pid == 0) {
		ASSERT_TRUE(lu_memfd_holds(m, "parent data"));
		ASSERT_EQ(lseek(m, 5, SEEK_SET), 5);
		/* The child's own memfd and session through the inherited
		 * device. */
		int own = lu_memfd_with("child", "child data");
		ASSERT_GE(own, 0);
		int s = lu_create_session(dev, "from-the-child");
		ASSERT_GE(s, 0);
		ASSERT_EQ(close(s), 0);
		ASSERT_EQ(close(m), 0);
		ASSERT_EQ(close(dev), 0);
		/* The parent calls while this connection stays open. */
		char c;
		ASSERT_EQ(read(go[0], &c, 1), 1);
		exit(tap_failed);
	}
	/* The parent's call while the child is alive and connected. */
	ASSERT_TRUE(lu_memfd_holds(m, "parent data"));
	ASSERT_EQ(write(go[1], "g", 1), 1);
	int st;
	ASSERT_EQ(waitpid(pid, &st, 0), pid);
	ASSERT_TRUE(WIFEXITED(st) && WEXITSTATUS(st) == 0);
	/* Shared open file: the child's seek moved the parent's offset. */
	ASSERT_EQ(lseek(m, 0, SEEK_CUR), 5);
	/* The child's close did not close the parent's fds. */
	ASSERT_TRUE(lu_memfd_holds(m, "parent data"));
	int s = lu_create_session(dev, "from-the-parent");
	ASSERT_GE(s, 0);
	/* The child's session was unpreserved when it closed it. */
	s = lu_create_session(dev, "from-the-child");
	ASSERT_GE(s, 0);
}

/* A grandchild forked by a forked child works too. */
TEST(fork_of_a_forked_child)
{
	int m = lu_memfd_with("deep", "deep data");
	ASSERT_GE(m, 0);
	pid_t pid = fork();
	ASSERT_GE(pid, 0);
	if (pid == 0) {
		pid_t g = fork();
		ASSERT_GE(g, 0);
		if (g == 0) {
			ASSERT_TRUE(lu_memfd_holds(m, "deep data"));
			exit(tap_failed);
		}
		int st;
		ASSERT_EQ(waitpid(g, &st, 0), g);
		ASSERT_TRUE(WIFEXITED(st) && WEXITSTATUS(st) == 0);
		exit(tap_failed);
	}
	int st;
	ASSERT_EQ(waitpid(pid, &st, 0), pid);
	ASSERT_TRUE(WIFEXITED(st) && WEXITSTATUS(st) == 0);
}

static char self[4096];

/* exec_stage re-executes this program in stage name with fds a and b. */
static void exec_stage(const char *name, int a, int b)
{
	char sa[16], sb[16];
	snprintf(sa, sizeof(sa), "%d", a);
	snprintf(sb, sizeof(sb), "%d", b);
	execl(self, self, name, sa, sb, (char *)NULL);
	TAP_MSG("execl %s: %s", self, strerror(errno));
	exit(1);
}

/* Across exec, a memfd without FD_CLOEXEC keeps working under the same fd
 * number, and /dev/liveupdate opened O_CLOEXEC is closed in the host and in
 * the sentry (it opens again). */
TEST(exec_closes_cloexec_fds_and_keeps_the_others)
{
	int m = lu_memfd_with("kept", "kept across exec");
	ASSERT_GE(m, 0);
	int dev = open_dev(O_CLOEXEC);
	exec_stage("after-exec-cloexec", m, dev);
}

static int after_exec_cloexec(int m, int dev)
{
	ASSERT_EQ(fcntl(m, F_GETFD), 0);
	ASSERT_TRUE(lu_memfd_holds(m, "kept across exec"));
	ASSERT_EQ(lseek(m, 0, SEEK_CUR), (long)strlen("kept across exec"));
	ASSERT_TRUE(!is_open(dev) || dev == m);
	int again = open(LIVEUPDATE_DEV, O_RDWR);
	ASSERT_GE(again, 0);
	return tap_failed;
}

/* /dev/liveupdate opened without O_CLOEXEC stays open across exec: the
 * inherited fd creates sessions and a new open is EBUSY. */
TEST(exec_keeps_a_non_cloexec_device)
{
	int dev = open_dev(0);
	int m = lu_memfd_with("gone", "x");
	ASSERT_GE(m, 0);
	ASSERT_EQ(fcntl(m, F_SETFD, FD_CLOEXEC), 0);
	exec_stage("after-exec-kept", dev, m);
}

static int after_exec_kept(int dev, int m)
{
	ASSERT_EQ(fcntl(dev, F_GETFD), 0);
	errno = 0;
	ASSERT_EQ(open(LIVEUPDATE_DEV, O_RDWR), -1);
	ASSERT_EQ(errno, EBUSY);
	int s = lu_create_session(dev, "after-exec");
	ASSERT_GE(s, 0);
	/* The memfd marked FD_CLOEXEC with fcntl is gone. */
	ASSERT_TRUE(!is_open(m) || m == s);
	return tap_failed;
}

/* close_range closes placeholders and their sentry fds (the device opens
 * again) but not the shim's connection; CLOSE_RANGE_CLOEXEC marks both
 * sides. */
TEST(close_range_keeps_placeholders_consistent)
{
	int m1 = lu_memfd_with("cr1", "one");
	int m2 = lu_memfd_with("cr2", "two");
	ASSERT_GE(m1, 0);
	ASSERT_GE(m2, 0);
	ASSERT_EQ(close_range(m2, m2, CLOSE_RANGE_CLOEXEC), 0);
	ASSERT_EQ(fcntl(m2, F_GETFD), FD_CLOEXEC);
	int dev = open_dev(0);
	ASSERT_EQ(close_range(3, ~0U, 0), 0);
	ASSERT_TRUE(!is_open(m1));
	ASSERT_TRUE(!is_open(m2));
	ASSERT_TRUE(!is_open(dev));
	errno = 0;
	ASSERT_EQ(read(m1, &(char){0}, 1), -1);
	ASSERT_EQ(errno, EBADF);
	/* The sentry closed the device: it opens again, over the same
	 * connection. */
	dev = open_dev(0);
	int m3 = lu_memfd_with("cr3", "three");
	ASSERT_GE(m3, 0);
	ASSERT_TRUE(lu_memfd_holds(m3, "three"));
}

/* dup2 onto a placeholder replaces its sentry file (the device it held is
 * closed and opens again); dup2 of a host fd onto a placeholder does the
 * same and the fd is the host's from then on. */
TEST(dup2_onto_a_placeholder)
{
	int m = lu_memfd_with("src", "source");
	ASSERT_GE(m, 0);
	int dev = open_dev(0);
	ASSERT_EQ(dup2(m, dev), dev);
	ASSERT_TRUE(lu_memfd_holds(dev, "source"));
	struct stat a, b;
	ASSERT_EQ(fstat(m, &a), 0);
	ASSERT_EQ(fstat(dev, &b), 0);
	ASSERT_EQ(a.st_ino, b.st_ino);
	ASSERT_EQ(fcntl(dev, F_GETFD), 0);
	int dev2 = open_dev(0);
	int p[2];
	ASSERT_EQ(pipe(p), 0);
	ASSERT_EQ(dup3(p[1], dev2, O_CLOEXEC), dev2);
	ASSERT_EQ(write(dev2, "via pipe", 8), 8);
	char buf[8];
	ASSERT_EQ(read(p[0], buf, 8), 8);
	ASSERT_MEMEQ(buf, "via pipe", 8);
	int dev3 = open_dev(0);
	ASSERT_EQ(close(dev3), 0);
	/* dup3 with O_CLOEXEC onto a placeholder sets FD_CLOEXEC. */
	int d = dup3(m, 100, O_CLOEXEC);
	ASSERT_EQ(d, 100);
	ASSERT_EQ(fcntl(d, F_GETFD), FD_CLOEXEC);
	ASSERT_TRUE(lu_memfd_holds(d, "source"));
	int e = fcntl(m, F_DUPFD_CLOEXEC, 200);
	ASSERT_GE(e, 200);
	ASSERT_TRUE(lu_memfd_holds(e, "source"));
}

/* fstat reaches the sentry through each of glibc's entry points, and
 * readv/writev move a vector in one call. */
TEST(stat_forms_and_vectors)
{
	int m = memfd_create("vec", MFD_ALLOW_SEALING);
	ASSERT_GE(m, 0);
	struct iovec out[3] = {{"abc", 3}, {"", 0}, {"defgh", 5}};
	ASSERT_EQ(writev(m, out, 3), 8);
	struct stat a, b;
	ASSERT_EQ(fstat(m, &a), 0);
	ASSERT_EQ(a.st_size, 8);
	ASSERT_TRUE(S_ISREG(a.st_mode));
	ASSERT_EQ(fstatat(m, "", &b, AT_EMPTY_PATH), 0);
	ASSERT_EQ(b.st_ino, a.st_ino);
	struct statx sx;
	ASSERT_EQ(statx(m, "", AT_EMPTY_PATH, STATX_SIZE, &sx), 0);
	ASSERT_EQ(sx.stx_size, 8);
	ASSERT_EQ(sx.stx_ino, a.st_ino);
	char x[2], y[6];
	struct iovec in[2] = {{x, 2}, {y, 6}};
	ASSERT_EQ(lseek(m, 0, SEEK_SET), 0);
	ASSERT_EQ(readv(m, in, 2), 8);
	ASSERT_MEMEQ(x, "ab", 2);
	ASSERT_MEMEQ(y, "cdefgh", 6);
	/* Seals: a write-sealed file's shared mapping cannot become
	 * writable. */
	ASSERT_EQ(ftruncate(m, 4096), 0);
	ASSERT_EQ(fcntl(m, F_ADD_SEALS, F_SEAL_WRITE), 0);
	ASSERT_EQ(fcntl(m, F_GET_SEALS), F_SEAL_WRITE);
	void *p = mmap(NULL, 4096, PROT_READ, MAP_SHARED, m, 0);
	ASSERT_TRUE(p != MAP_FAILED);
	errno = 0;
	ASSERT_EQ(mprotect(p, 4096, PROT_READ | PROT_WRITE), -1);
	ASSERT_EQ(errno, EACCES);
	errno = 0;
	ASSERT_TRUE(mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, m, 0) == MAP_FAILED);
	ASSERT_EQ(errno, EPERM);
	ASSERT_EQ(munmap(p, 4096), 0);
}

enum { THREADS = 8, ROUNDS = 200 };

static void *hammer(void *arg)
{
	long id = (long)arg;
	char want[64], got[64];
	int m = memfd_create("thread", 0);
	if (m < 0)
		return (void *)1;
	for (int i = 0; i < ROUNDS; i++) {
		int n = snprintf(want, sizeof(want), "thread %ld round %d", id, i);
		if (pwrite(m, want, n, 0) != n || pread(m, got, n, 0) != n || memcmp(want, got, n) != 0)
			return (void *)1;
		struct stat st;
		if (fstat(m, &st) < 0 || st.st_size < n)
			return (void *)1;
	}
	unsigned char *p = mmap(NULL, 4096, PROT_READ, MAP_SHARED, m, 0);
	if (p == MAP_FAILED || p[0] != 't')
		return (void *)1;
	munmap(p, 4096);
	return close(m) == 0 ? NULL : (void *)1;
}

/* Threads calling at once each get their own answers. */
TEST(threads_call_concurrently)
{
	pthread_t t[THREADS];
	for (long i = 0; i < THREADS; i++)
		ASSERT_EQ(pthread_create(&t[i], NULL, hammer, (void *)i), 0);
	for (int i = 0; i < THREADS; i++) {
		void *r;
		ASSERT_EQ(pthread_join(t[i], &r), 0);
		EXPECT_EQ((long)r, 0);
	}
}

int main(int argc, char **argv)
{
	ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
	if (n > 0)
		self[n] = 0;
	if (argc == 4 && strcmp(argv[1], "after-exec-cloexec") == 0)
		return after_exec_cloexec(atoi(argv[2]), atoi(argv[3]));
	if (argc == 4 && strcmp(argv[1], "after-exec-kept") == 0)
		return after_exec_kept(atoi(argv[2]), atoi(argv[3]));
	return tap_main();
}
