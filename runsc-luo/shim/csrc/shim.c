// livesentry libc shim: an LD_PRELOAD library that lets an unmodified,
// dynamically linked program use its sandbox's sentry through the libc calls
// it already makes.
//
// What it does
//
// The shim speaks the guest protocol (pkg/abi/guest) on one connection of
// the sandbox's guest socket, named by LIVESENTRY_GUEST_SOCKET; it dials it
// on the first call that needs the sentry. Opening /dev/liveupdate and
// memfd_create make files in the sentry; every sentry fd appears in the
// process as a placeholder, a real host fd (an open of /dev/null) with the
// same FD_CLOEXEC flag, so fd numbers stay distinct from host fds and
// close_range, poll and exec see real descriptors. The shim keeps the map
// placeholder -> sentry fd and turns the libc calls on placeholders (read,
// write, ioctl, mmap, fcntl, dup, close, ...) into guest calls. Calls on
// any other fd go to libc unchanged.
//
// fork: the parent asks the sentry for a copy of its fd table and mappings
// (fork) while holding the connection lock, forks, and the child dials a new
// connection and attaches the copy, using only async-signal-safe calls.
// vfork is a fork.
//
// execve and the exec family: the connection fd and the placeholder map
// cross the exec in the environment variable LIVESENTRY_SHIM_STATE
// ("conn;ph:sfd,ph:sfd,..."); the host closes FD_CLOEXEC placeholders and
// the new image's shim sends execve, so the sentry closes the FD_CLOEXEC
// sentry fds and drops the mappings, as a successful execve does.
//
// Thread safety: one mutex serialises the connection and the map; one
// request is in flight at a time. The map is read without the lock to tell
// placeholders from host fds (an atomic load); the lock is then taken and
// the entry read again.
//
// What it does not cover (and how each fails) is in docs/guests.md,
// "Unmodified programs".
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

// The guest protocol, version 2 (pkg/abi/guest/guest.go). A Go test checks
// these against the Go package.
#define GUEST_MAGIC "LSGUEST"
enum {
	GUEST_VERSION = 3,
	HELLO_SIZE = 16,
	REQ_SIZE = 48,
	RESP_SIZE = 24,
	STAT_SIZE = 40,
	RUN_SIZE = 24,
	MAX_SMALL_PAYLOAD = 4096,
	MAX_WRITE_PAYLOAD = 0x7ffff000,
	MAX_REPLY_PAYLOAD = 4096,
	MMAP_MAY_WRITE = 1,
	HELLO_START_GATE = 1,
	START_GATE_WAITING = 119,
	START_GATE_OPEN = 103,
};
enum {
	OP_MEMFD_CREATE = 1,
	OP_CLOSE = 2,
	OP_DUP = 3,
	OP_DUP3 = 4,
	OP_READ = 5,
	OP_WRITE = 6,
	OP_PREAD64 = 7,
	OP_PWRITE64 = 8,
	OP_LSEEK = 9,
	OP_FTRUNCATE = 10,
	OP_FALLOCATE = 11,
	OP_FSTAT = 12,
	OP_FCNTL = 13,
	OP_OPEN = 14,
	OP_IOCTL = 15,
	OP_MMAP = 16,
	OP_MUNMAP = 17,
	OP_FORK = 18,
	OP_ATTACH = 19,
	OP_EXECVE = 20,
};
enum {
	KIND_DATA = 1,
	KIND_RESULT = 2,
	KIND_FATAL = 3,
	KIND_FILE = 4,
};

// The LUO uapi (include/uapi/linux/liveupdate.h): all ioctls are
// _IO(0xBA, nr), the first u32 of each argument is its size, and the fd of
// four of them sits at byte 4.
enum {
	LUO_TYPE = 0xBA,
	LUO_CREATE_SESSION = 0x00,
	LUO_RETRIEVE_SESSION = 0x01,
	LUO_PRESERVE_FD = 0x40,
	LUO_RETRIEVE_FD = 0x41,
	LUO_PRESERVE_FD_SIZE = 16,
};

#define ENV_SOCKET "LIVESENTRY_GUEST_SOCKET"
#define ENV_STATE "LIVESENTRY_SHIM_STATE"
#define ENV_START_FD "LIVESENTRY_START_FD"
#define DEV_LIVEUPDATE "/dev/liveupdate"
#define PAGE 4096UL

// MAX_FDS bounds the placeholder numbers the shim tracks; a placeholder
// would be EMFILE beyond it.
#define MAX_FDS 65536

// sfd_of[ph] is the sentry fd behind placeholder ph, plus one (0: ph is
// not a placeholder). Written under mu; read with atomic loads.
static int32_t sfd_of[MAX_FDS];

// mu serialises the connection, the map's writers and the mappings.
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
// conn is the connection's host fd, -1 before the first dial. broken is set
// once it failed; calls answer EIO from then on.
static int conn = -1;
static int broken;
// sock_path is LIVESENTRY_GUEST_SOCKET, read at load time so that a forked
// child can dial without touching the environment.
static char sock_path[sizeof(((struct sockaddr_un *)0)->sun_path)];
// max_ph is one past the highest placeholder ever made (a bound for scans).
static int max_ph;

// A mapping of a sentry file in this process.
struct mapping {
	uintptr_t addr, len;
	uint64_t id;
	int may_write;
};
static struct mapping *maps;
static size_t nmaps, capmaps;

// ---- raw I/O: never through the interposed libc calls ----

static long sys_close(int fd) { return syscall(SYS_close, fd); }

static int sys_fcntl(int fd, int cmd, long arg) { return (int)syscall(SYS_fcntl, fd, cmd, arg); }

// write_all sends iov completely (sendmsg, no SIGPIPE). It returns 0 or
// -1.
static int write_all(struct iovec *iov, int n)
{
	while (n > 0) {
		struct msghdr m = {.msg_iov = iov, .msg_iovlen = n > 1024 ? 1024 : n};
		ssize_t w = sendmsg(conn, &m, MSG_NOSIGNAL);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		while (n > 0 && (size_t)w >= iov->iov_len) {
			w -= iov->iov_len;
			iov++;
			n--;
		}
		if (n > 0) {
			iov->iov_base = (char *)iov->iov_base + w;
			iov->iov_len -= w;
		}
	}
	return 0;
}

// read_all reads exactly len bytes; with fdp, a file passed with them as
// SCM_RIGHTS is stored there (close-on-exec). It returns 0 or -1.
static int read_all(void *buf, size_t len, int *fdp)
{
	char *p = buf;
	while (len > 0) {
		union {
			char b[CMSG_SPACE(sizeof(int))];
			struct cmsghdr align;
		} cm;
		struct iovec iov = {.iov_base = p, .iov_len = len};
		struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1};
		if (fdp) {
			m.msg_control = cm.b;
			m.msg_controllen = sizeof(cm.b);
		}
		ssize_t r = recvmsg(conn, &m, MSG_CMSG_CLOEXEC);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		if (fdp) {
			for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c)) {
				if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
					int n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
					int *fds = (int *)CMSG_DATA(c);
					for (int i = 0; i < n; i++) {
						if (*fdp < 0)
							*fdp = fds[i];
						else
							sys_close(fds[i]);
					}
				}
			}
		}
		if (r == 0)
			return -1;
		p += r;
		len -= r;
	}
	return 0;
}

static void put32(unsigned char *b, uint32_t v) { memcpy(b, &v, 4); }
static void put64(unsigned char *b, uint64_t v) { memcpy(b, &v, 8); }
static uint32_t get32(const unsigned char *b) { uint32_t v; memcpy(&v, b, 4); return v; }
static uint64_t get64(const unsigned char *b) { uint64_t v; memcpy(&v, b, 8); return v; }

// fail_conn marks the connection broken.
static void fail_conn(void)
{
	broken = 1;
}

// ---- the connection ----

// dial_locked connects to the sentry and says hello. Async-signal-safe (a
// forked child calls it). It returns 0 or -errno.
static int dial_locked(void)
{
	if (sock_path[0] == 0)
		return -ENOSYS;
	int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (s < 0)
		return -errno;
	struct sockaddr_un a = {.sun_family = AF_UNIX};
	memcpy(a.sun_path, sock_path, sizeof(a.sun_path));
	if (connect(s, (struct sockaddr *)&a, sizeof(a)) < 0) {
		int e = errno;
		sys_close(s);
		return -e;
	}
	// Out of the way of the low numbers a program expects to get.
	struct rlimit rl;
	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur > 600) {
		int hi = sys_fcntl(s, F_DUPFD_CLOEXEC, 512);
		if (hi >= 0) {
			sys_close(s);
			s = hi;
		}
	}
	conn = s;
	broken = 0;
	unsigned char h[HELLO_SIZE] = {0};
	memcpy(h, GUEST_MAGIC, 8);
	put32(h + 8, GUEST_VERSION);
	// The flags: every program under the shim waits at a start gate when
	// it is given one (shim_init).
	put32(h + 12, HELLO_START_GATE);
	struct iovec iov = {.iov_base = h, .iov_len = sizeof(h)};
	if (write_all(&iov, 1) < 0 || read_all(h, sizeof(h), NULL) < 0 ||
	    memcmp(h, GUEST_MAGIC, 8) != 0 || get32(h + 12) != 0) {
		int e = get32(h + 12) ? (int)get32(h + 12) : EIO;
		sys_close(s);
		conn = -1;
		return -e;
	}
	return 0;
}

// ensure_conn_locked dials if this process has no connection yet.
static int ensure_conn_locked(void)
{
	if (broken)
		return -EIO;
	if (conn >= 0)
		return 0;
	return dial_locked();
}

// A sink says where data frames go: an iovec list (read) or a growing
// buffer (mmap's runs).
struct sink {
	const struct iovec *iov;
	int niov;
	size_t cap;  // bytes the caller can take
	size_t got;
	unsigned char *buf;  // growing buffer, or NULL
	size_t bufcap;
};

// sink_take reads len bytes of a data frame into s.
static int sink_take(struct sink *s, size_t len)
{
	if (s == NULL || s->got + len > s->cap)
		return -1;
	if (s->buf || s->iov == NULL) {
		if (s->got + len > s->bufcap) {
			size_t nc = s->bufcap ? s->bufcap * 2 : 4096;
			while (nc < s->got + len)
				nc *= 2;
			unsigned char *nb = realloc(s->buf, nc);
			if (nb == NULL)
				return -1;
			s->buf = nb;
			s->bufcap = nc;
		}
		if (read_all(s->buf + s->got, len, NULL) < 0)
			return -1;
		s->got += len;
		return 0;
	}
	size_t off = s->got;
	for (int i = 0; i < s->niov && len > 0; i++) {
		if (off >= s->iov[i].iov_len) {
			off -= s->iov[i].iov_len;
			continue;
		}
		size_t n = s->iov[i].iov_len - off;
		if (n > len)
			n = len;
		if (read_all((char *)s->iov[i].iov_base + off, n, NULL) < 0)
			return -1;
		s->got += n;
		len -= n;
		off = 0;
	}
	return len == 0 ? 0 : -1;
}

// ERESTART_SENTRY is the errno of a call that a restart's pause
// interrupted (Linux's ERESTARTSYS); its result is the bytes done.
#define ERESTART_SENTRY 512

// restart_done is the bytes done by the last call that returned
// -ERESTART_SENTRY. Under mu.
static long restart_done;

// call_locked makes one guest call: op with args and the payload pay (npay
// iovecs, paylen bytes). Data frames go to sink, the reply payload to
// reply (up to replycap bytes; its length in *replylen), a file frame's
// file to *filep. It returns the result, or -errno (EIO when the
// connection failed).
static long call_locked(uint32_t op, const uint64_t args[5], const struct iovec *pay, int npay,
			size_t paylen, struct sink *sink, void *reply, size_t replycap,
			size_t *replylen, int *filep)
{
	int e = ensure_conn_locked();
	if (e < 0)
		return e;
again:;
	unsigned char h[REQ_SIZE] = {0};
	put32(h, op);
	put32(h + 4, (uint32_t)paylen);
	for (int i = 0; i < 5; i++)
		put64(h + 8 + 8 * i, args ? args[i] : 0);
	struct iovec stackv[9];
	struct iovec *v = stackv;
	if (npay + 1 > 9) {
		v = malloc(sizeof(*v) * (npay + 1));
		if (v == NULL)
			return -ENOMEM;
	}
	v[0].iov_base = h;
	v[0].iov_len = sizeof(h);
	size_t left = paylen;
	int nv = 1;
	for (int i = 0; i < npay && left > 0; i++) {
		size_t n = pay[i].iov_len < left ? pay[i].iov_len : left;
		if (n == 0)
			continue;
		v[nv].iov_base = pay[i].iov_base;
		v[nv].iov_len = n;
		left -= n;
		nv++;
	}
	int werr = write_all(v, nv);
	if (v != stackv)
		free(v);
	if (werr < 0) {
		fail_conn();
		return -EIO;
	}
	for (;;) {
		unsigned char r[RESP_SIZE];
		if (read_all(r, sizeof(r), filep) < 0) {
			fail_conn();
			return -EIO;
		}
		uint32_t kind = get32(r), len = get32(r + 4), err = get32(r + 8);
		int64_t res = (int64_t)get64(r + 16);
		switch (kind) {
		case KIND_DATA:
			if (sink_take(sink, len) < 0) {
				fail_conn();
				return -EIO;
			}
			break;
		case KIND_FILE:
			if (len != 0) {
				fail_conn();
				return -EIO;
			}
			break;
		case KIND_RESULT: {
			unsigned char rb[MAX_REPLY_PAYLOAD];
			if (len > sizeof(rb) || read_all(rb, len, NULL) < 0) {
				fail_conn();
				return -EIO;
			}
			if (err == ERESTART_SENTRY) {
				// A restart's pause interrupted the call after res
				// bytes: none, so it is sent again (it waits in the
				// sentry until it serves again), or some, which the
				// caller counts before asking for the rest.
				if (res < 0 || (uint64_t)res > paylen + (sink ? sink->cap : 0)) {
					fail_conn();
					return -EIO;
				}
				if (res == 0)
					goto again;
				restart_done = res;
				return -ERESTART_SENTRY;
			}
			if (err != 0)
				return -(long)err;
			size_t n = len < replycap ? len : replycap;
			if (reply)
				memcpy(reply, rb, n);
			if (replylen)
				*replylen = n;
			return res;
		}
		default: {
			// KIND_FATAL or garbage: the sentry closes the connection.
			char msg[256];
			size_t n = len < sizeof(msg) - 1 ? len : sizeof(msg) - 1;
			if (kind == KIND_FATAL && read_all(msg, n, NULL) == 0) {
				msg[n] = 0;
				static const char pre[] = "livesentry shim: the sentry closed the connection: ";
				(void)!syscall(SYS_write, 2, pre, sizeof(pre) - 1);
				(void)!syscall(SYS_write, 2, msg, n);
				(void)!syscall(SYS_write, 2, "\n", 1);
			}
			fail_conn();
			return -EIO;
		}
		}
	}
}

// simple_locked is a call without payload, data or reply.
static long simple_locked(uint32_t op, uint64_t a0, uint64_t a1, uint64_t a2, uint64_t a3)
{
	uint64_t args[5] = {a0, a1, a2, a3, 0};
	return call_locked(op, args, NULL, 0, 0, NULL, NULL, 0, NULL, NULL);
}

// ret turns a result or -errno into libc's convention.
static long ret(long r)
{
	if (r < 0) {
		errno = (int)-r;
		return -1;
	}
	return r;
}

// ---- the placeholder map ----

// sentry_fd returns the sentry fd behind fd, or -1 if fd is not a
// placeholder. Lock-free.
static int sentry_fd(int fd)
{
	if (fd < 0 || fd >= MAX_FDS)
		return -1;
	return __atomic_load_n(&sfd_of[fd], __ATOMIC_ACQUIRE) - 1;
}

static void set_map_locked(int ph, int sfd)
{
	__atomic_store_n(&sfd_of[ph], sfd + 1, __ATOMIC_RELEASE);
	if (sfd >= 0 && ph + 1 > max_ph)
		max_ph = ph + 1;
}

// new_placeholder_locked gives sentry fd sfd a placeholder with FD_CLOEXEC
// as cloexec says. On failure it closes sfd in the sentry and returns
// -errno.
static int new_placeholder_locked(int sfd, int cloexec)
{
	int ph = (int)syscall(SYS_openat, AT_FDCWD, "/dev/null", O_RDWR | (cloexec ? O_CLOEXEC : 0));
	if (ph >= MAX_FDS) {
		sys_close(ph);
		ph = -1;
		errno = EMFILE;
	}
	if (ph < 0) {
		int e = errno;
		simple_locked(OP_CLOSE, sfd, 0, 0, 0);
		return -e;
	}
	set_map_locked(ph, sfd);
	return ph;
}

// adopt_locked makes a placeholder for sentry fd sfd, asking the sentry for
// its FD_CLOEXEC.
static int adopt_locked(int sfd)
{
	long fl = simple_locked(OP_FCNTL, sfd, F_GETFD, 0, 0);
	if (fl < 0) {
		simple_locked(OP_CLOSE, sfd, 0, 0, 0);
		return (int)fl;
	}
	return new_placeholder_locked(sfd, fl & FD_CLOEXEC);
}

// A locked section on placeholder fd: lock, and read the entry again (it
// may have changed since the unlocked look).
#define LOCKED_SFD(fd, sfd)                                  \
	pthread_mutex_lock(&mu);                             \
	int sfd = sentry_fd(fd);                             \
	if (sfd < 0) {                                       \
		pthread_mutex_unlock(&mu);                   \
		errno = EBADF;                               \
		return -1;                                   \
	}

// ---- libc's own functions ----

#define REAL(name) real_##name
#define DECLARE_REAL(ret, name, ...)                                          \
	static ret (*real_##name)(__VA_ARGS__);                               \
	/* Never a tail call: dlsym(RTLD_NEXT) looks at its caller. */     \
	static void __attribute__((constructor(101),                         \
				   optimize("no-optimize-sibling-calls")))   \
	load_##name(void)                                                     \
	{                                                                     \
		real_##name = (ret(*)(__VA_ARGS__))dlsym(RTLD_NEXT, #name); \
	}

DECLARE_REAL(int, open, const char *, int, ...)
DECLARE_REAL(int, open64, const char *, int, ...)
DECLARE_REAL(int, openat, int, const char *, int, ...)
DECLARE_REAL(int, openat64, int, const char *, int, ...)
DECLARE_REAL(int, __open_2, const char *, int)
DECLARE_REAL(int, __open64_2, const char *, int)
DECLARE_REAL(int, __openat_2, int, const char *, int)
DECLARE_REAL(int, __openat64_2, int, const char *, int)
DECLARE_REAL(int, ioctl, int, unsigned long, ...)
DECLARE_REAL(int, memfd_create, const char *, unsigned int)
DECLARE_REAL(ssize_t, read, int, void *, size_t)
DECLARE_REAL(ssize_t, write, int, const void *, size_t)
DECLARE_REAL(ssize_t, pread, int, void *, size_t, off_t)
DECLARE_REAL(ssize_t, pread64, int, void *, size_t, off_t)
DECLARE_REAL(ssize_t, pwrite, int, const void *, size_t, off_t)
DECLARE_REAL(ssize_t, pwrite64, int, const void *, size_t, off_t)
DECLARE_REAL(ssize_t, __read_chk, int, void *, size_t, size_t)
DECLARE_REAL(ssize_t, __pread_chk, int, void *, size_t, off_t, size_t)
DECLARE_REAL(ssize_t, __pread64_chk, int, void *, size_t, off_t, size_t)
DECLARE_REAL(ssize_t, readv, int, const struct iovec *, int)
DECLARE_REAL(ssize_t, writev, int, const struct iovec *, int)
DECLARE_REAL(off_t, lseek, int, off_t, int)
DECLARE_REAL(off_t, lseek64, int, off_t, int)
DECLARE_REAL(int, ftruncate, int, off_t)
DECLARE_REAL(int, ftruncate64, int, off_t)
DECLARE_REAL(int, fallocate, int, int, off_t, off_t)
DECLARE_REAL(int, fallocate64, int, int, off_t, off_t)
DECLARE_REAL(int, posix_fallocate, int, off_t, off_t)
DECLARE_REAL(int, fstat, int, struct stat *)
DECLARE_REAL(int, fstat64, int, struct stat64 *)
DECLARE_REAL(int, fstatat, int, const char *, struct stat *, int)
DECLARE_REAL(int, fstatat64, int, const char *, struct stat64 *, int)
DECLARE_REAL(int, __fxstat, int, int, struct stat *)
DECLARE_REAL(int, __fxstat64, int, int, struct stat64 *)
DECLARE_REAL(int, __fxstatat, int, int, const char *, struct stat *, int)
DECLARE_REAL(int, __fxstatat64, int, int, const char *, struct stat64 *, int)
DECLARE_REAL(int, statx, int, const char *, int, unsigned int, struct statx *)
DECLARE_REAL(int, fcntl, int, int, ...)
DECLARE_REAL(int, fcntl64, int, int, ...)
DECLARE_REAL(int, close, int)
DECLARE_REAL(int, close_range, unsigned int, unsigned int, int)
DECLARE_REAL(int, dup, int)
DECLARE_REAL(int, dup2, int, int)
DECLARE_REAL(int, dup3, int, int, int)
DECLARE_REAL(void *, mmap, void *, size_t, int, int, int, off_t)
DECLARE_REAL(void *, mmap64, void *, size_t, int, int, int, off_t)
DECLARE_REAL(int, munmap, void *, size_t)
DECLARE_REAL(int, mprotect, void *, size_t, int)
DECLARE_REAL(pid_t, fork, void)
DECLARE_REAL(int, execve, const char *, char *const[], char *const[])
DECLARE_REAL(int, execvpe, const char *, char *const[], char *const[])
DECLARE_REAL(int, fexecve, int, char *const[], char *const[])

// ---- open, memfd_create ----

// is_dev_liveupdate reports whether (dirfd, path) names /dev/liveupdate.
static int is_dev_liveupdate(int dirfd, const char *path)
{
	(void)dirfd;
	return path != NULL && strcmp(path, DEV_LIVEUPDATE) == 0 && sock_path[0] != 0;
}

static int open_liveupdate(int flags)
{
	static const char p[] = DEV_LIVEUPDATE;
	struct iovec v = {.iov_base = (void *)p, .iov_len = sizeof(p)};
	uint64_t args[5] = {(uint64_t)(uint32_t)flags};
	pthread_mutex_lock(&mu);
	long sfd = call_locked(OP_OPEN, args, &v, 1, sizeof(p), NULL, NULL, 0, NULL, NULL);
	if (sfd >= 0)
		sfd = new_placeholder_locked((int)sfd, flags & O_CLOEXEC);
	pthread_mutex_unlock(&mu);
	return (int)ret(sfd);
}

#define OPEN_MODE(flags)                                          \
	mode_t mode = 0;                                          \
	if ((flags) & (O_CREAT | __O_TMPFILE)) {                  \
		va_list ap;                                       \
		va_start(ap, flags);                              \
		mode = va_arg(ap, mode_t);                        \
		va_end(ap);                                       \
	}

int open(const char *path, int flags, ...)
{
	OPEN_MODE(flags);
	if (is_dev_liveupdate(AT_FDCWD, path))
		return open_liveupdate(flags);
	return REAL(open)(path, flags, mode);
}

int open64(const char *path, int flags, ...)
{
	OPEN_MODE(flags);
	if (is_dev_liveupdate(AT_FDCWD, path))
		return open_liveupdate(flags);
	return REAL(open64)(path, flags, mode);
}

int openat(int dirfd, const char *path, int flags, ...)
{
	OPEN_MODE(flags);
	if (is_dev_liveupdate(dirfd, path))
		return open_liveupdate(flags);
	return REAL(openat)(dirfd, path, flags, mode);
}

int openat64(int dirfd, const char *path, int flags, ...)
{
	OPEN_MODE(flags);
	if (is_dev_liveupdate(dirfd, path))
		return open_liveupdate(flags);
	return REAL(openat64)(dirfd, path, flags, mode);
}

int __open_2(const char *path, int flags)
{
	return is_dev_liveupdate(AT_FDCWD, path) ? open_liveupdate(flags) : REAL(__open_2)(path, flags);
}

int __open64_2(const char *path, int flags)
{
	return is_dev_liveupdate(AT_FDCWD, path) ? open_liveupdate(flags) : REAL(__open64_2)(path, flags);
}

int __openat_2(int dirfd, const char *path, int flags)
{
	return is_dev_liveupdate(dirfd, path) ? open_liveupdate(flags) : REAL(__openat_2)(dirfd, path, flags);
}

int __openat64_2(int dirfd, const char *path, int flags)
{
	return is_dev_liveupdate(dirfd, path) ? open_liveupdate(flags) : REAL(__openat64_2)(dirfd, path, flags);
}

int memfd_create(const char *name, unsigned int flags)
{
	if (sock_path[0] == 0)
		return REAL(memfd_create)(name, flags);
	if (name == NULL) {
		errno = EFAULT;
		return -1;
	}
	// memfd_create copies at most NAME_MAX - strlen("memfd:") bytes and
	// fails with EINVAL past that; the sentry checks, given the NUL.
	size_t n = strnlen(name, MAX_SMALL_PAYLOAD - 1);
	struct iovec v[2] = {{.iov_base = (void *)name, .iov_len = n}, {.iov_base = "", .iov_len = 1}};
	uint64_t args[5] = {flags};
	pthread_mutex_lock(&mu);
	long sfd = call_locked(OP_MEMFD_CREATE, args, v, 2, n + 1, NULL, NULL, 0, NULL, NULL);
	if (sfd >= 0)
		sfd = new_placeholder_locked((int)sfd, flags & MFD_CLOEXEC);
	pthread_mutex_unlock(&mu);
	return (int)ret(sfd);
}

// ---- read, write and friends ----

// do_read is read, pread, readv and preadv. A call interrupted by a
// restart's pause after some bytes is repeated for the rest (the sink
// carries on where it stopped), so the program sees one call.
static ssize_t do_read(int fd, const struct iovec *iov, int n, int64_t off)
{
	size_t count = 0;
	for (int i = 0; i < n; i++)
		count += iov[i].iov_len;
	if (count > MAX_WRITE_PAYLOAD)
		count = MAX_WRITE_PAYLOAD;
	LOCKED_SFD(fd, sfd);
	struct sink s = {.iov = iov, .niov = n, .cap = count};
	size_t done = 0;
	long r;
	for (;;) {
		uint64_t args[5] = {(uint64_t)sfd, count - done, off < 0 ? (uint64_t)off : (uint64_t)off + done};
		r = call_locked(off < 0 ? OP_READ : OP_PREAD64, args, NULL, 0, 0, &s, NULL, 0, NULL, NULL);
		if (r == -ERESTART_SENTRY) {
			done += (size_t)restart_done;
			if (done != s.got) {
				fail_conn();
				r = -EIO;
				break;
			}
			if (done < count)
				continue;
			r = 0;
		}
		if (r >= 0 && done + (size_t)r != s.got) {
			fail_conn();
			r = -EIO;
		}
		break;
	}
	if (r >= 0)
		r += (long)done;
	else if (done > 0)
		r = (long)done;
	pthread_mutex_unlock(&mu);
	return ret(r);
}

// do_write is write, pwrite, writev and pwritev, restarted like do_read.
static ssize_t do_write(int fd, const struct iovec *iov, int n, int64_t off)
{
	size_t count = 0;
	for (int i = 0; i < n; i++)
		count += iov[i].iov_len;
	if (count > MAX_WRITE_PAYLOAD)
		count = MAX_WRITE_PAYLOAD;
	LOCKED_SFD(fd, sfd);
	size_t done = 0;
	long r;
	for (;;) {
		// The iovecs of the bytes not written yet.
		struct iovec stackv[8];
		struct iovec *rest = stackv;
		if (n > 8 && (rest = malloc(sizeof(*rest) * n)) == NULL) {
			r = -ENOMEM;
			break;
		}
		int nr = 0;
		size_t skip = done;
		for (int i = 0; i < n; i++) {
			if (skip >= iov[i].iov_len) {
				skip -= iov[i].iov_len;
				continue;
			}
			rest[nr].iov_base = (char *)iov[i].iov_base + skip;
			rest[nr].iov_len = iov[i].iov_len - skip;
			skip = 0;
			nr++;
		}
		uint64_t args[5] = {(uint64_t)sfd, off < 0 ? (uint64_t)off : (uint64_t)off + done};
		r = call_locked(off < 0 ? OP_WRITE : OP_PWRITE64, args, rest, nr, count - done, NULL, NULL, 0, NULL, NULL);
		if (rest != stackv)
			free(rest);
		if (r == -ERESTART_SENTRY) {
			done += (size_t)restart_done;
			if (done < count)
				continue;
			r = 0;
		}
		break;
	}
	if (r >= 0)
		r += (long)done;
	else if (done > 0)
		r = (long)done;
	pthread_mutex_unlock(&mu);
	return ret(r);
}

ssize_t read(int fd, void *buf, size_t count)
{
	if (sentry_fd(fd) < 0)
		return REAL(read)(fd, buf, count);
	struct iovec v = {.iov_base = buf, .iov_len = count};
	return do_read(fd, &v, 1, -1);
}

ssize_t write(int fd, const void *buf, size_t count)
{
	if (sentry_fd(fd) < 0)
		return REAL(write)(fd, buf, count);
	struct iovec v = {.iov_base = (void *)buf, .iov_len = count};
	return do_write(fd, &v, 1, -1);
}

static ssize_t do_pread(int fd, void *buf, size_t count, off_t off)
{
	if (off < 0) {
		errno = EINVAL;
		return -1;
	}
	struct iovec v = {.iov_base = buf, .iov_len = count};
	return do_read(fd, &v, 1, off);
}

static ssize_t do_pwrite(int fd, const void *buf, size_t count, off_t off)
{
	if (off < 0) {
		errno = EINVAL;
		return -1;
	}
	struct iovec v = {.iov_base = (void *)buf, .iov_len = count};
	return do_write(fd, &v, 1, off);
}

ssize_t pread(int fd, void *buf, size_t count, off_t off)
{
	if (sentry_fd(fd) < 0)
		return REAL(pread)(fd, buf, count, off);
	return do_pread(fd, buf, count, off);
}

ssize_t pread64(int fd, void *buf, size_t count, off_t off)
{
	if (sentry_fd(fd) < 0)
		return REAL(pread64)(fd, buf, count, off);
	return do_pread(fd, buf, count, off);
}

ssize_t pwrite(int fd, const void *buf, size_t count, off_t off)
{
	if (sentry_fd(fd) < 0)
		return REAL(pwrite)(fd, buf, count, off);
	return do_pwrite(fd, buf, count, off);
}

ssize_t pwrite64(int fd, const void *buf, size_t count, off_t off)
{
	if (sentry_fd(fd) < 0)
		return REAL(pwrite64)(fd, buf, count, off);
	return do_pwrite(fd, buf, count, off);
}

// The _FORTIFY_SOURCE forms: past the buffer, libc's own aborts before it
// reads anything.
ssize_t __read_chk(int fd, void *buf, size_t count, size_t buflen)
{
	if (count > buflen || sentry_fd(fd) < 0)
		return REAL(__read_chk)(fd, buf, count, buflen);
	struct iovec v = {.iov_base = buf, .iov_len = count};
	return do_read(fd, &v, 1, -1);
}

ssize_t __pread_chk(int fd, void *buf, size_t count, off_t off, size_t buflen)
{
	if (count > buflen || sentry_fd(fd) < 0)
		return REAL(__pread_chk)(fd, buf, count, off, buflen);
	return do_pread(fd, buf, count, off);
}

ssize_t __pread64_chk(int fd, void *buf, size_t count, off_t off, size_t buflen)
{
	if (count > buflen || sentry_fd(fd) < 0)
		return REAL(__pread64_chk)(fd, buf, count, off, buflen);
	return do_pread(fd, buf, count, off);
}

ssize_t readv(int fd, const struct iovec *iov, int n)
{
	if (sentry_fd(fd) < 0)
		return REAL(readv)(fd, iov, n);
	if (n < 0 || n > IOV_MAX) {
		errno = EINVAL;
		return -1;
	}
	return do_read(fd, iov, n, -1);
}

ssize_t writev(int fd, const struct iovec *iov, int n)
{
	if (sentry_fd(fd) < 0)
		return REAL(writev)(fd, iov, n);
	if (n < 0 || n > IOV_MAX) {
		errno = EINVAL;
		return -1;
	}
	return do_write(fd, iov, n, -1);
}

static off_t do_lseek(int fd, off_t off, int whence)
{
	LOCKED_SFD(fd, sfd);
	long r = simple_locked(OP_LSEEK, sfd, (uint64_t)off, (uint64_t)whence, 0);
	pthread_mutex_unlock(&mu);
	return ret(r);
}

off_t lseek(int fd, off_t off, int whence)
{
	return sentry_fd(fd) < 0 ? REAL(lseek)(fd, off, whence) : do_lseek(fd, off, whence);
}

off_t lseek64(int fd, off_t off, int whence)
{
	return sentry_fd(fd) < 0 ? REAL(lseek64)(fd, off, whence) : do_lseek(fd, off, whence);
}

static int do_ftruncate(int fd, off_t len)
{
	if (len < 0) {
		errno = EINVAL;
		return -1;
	}
	LOCKED_SFD(fd, sfd);
	long r = simple_locked(OP_FTRUNCATE, sfd, (uint64_t)len, 0, 0);
	pthread_mutex_unlock(&mu);
	return (int)ret(r);
}

int ftruncate(int fd, off_t len)
{
	return sentry_fd(fd) < 0 ? REAL(ftruncate)(fd, len) : do_ftruncate(fd, len);
}

int ftruncate64(int fd, off_t len)
{
	return sentry_fd(fd) < 0 ? REAL(ftruncate64)(fd, len) : do_ftruncate(fd, len);
}

static int do_fallocate(int fd, int mode, off_t off, off_t len)
{
	LOCKED_SFD(fd, sfd);
	long r = simple_locked(OP_FALLOCATE, sfd, (uint64_t)mode, (uint64_t)off, (uint64_t)len);
	pthread_mutex_unlock(&mu);
	return (int)ret(r);
}

int fallocate(int fd, int mode, off_t off, off_t len)
{
	return sentry_fd(fd) < 0 ? REAL(fallocate)(fd, mode, off, len) : do_fallocate(fd, mode, off, len);
}

int fallocate64(int fd, int mode, off_t off, off_t len)
{
	return sentry_fd(fd) < 0 ? REAL(fallocate64)(fd, mode, off, len) : do_fallocate(fd, mode, off, len);
}

int posix_fallocate(int fd, off_t off, off_t len)
{
	if (sentry_fd(fd) < 0)
		return REAL(posix_fallocate)(fd, off, len);
	// posix_fallocate returns the error instead of setting errno.
	if (do_fallocate(fd, 0, off, len) < 0)
		return errno;
	return 0;
}

// ---- stat ----

// sentry_stat is fstat of a placeholder into the guest protocol's fields.
struct gstat {
	int64_t size, blocks, blksize;
	uint32_t mode, nlink;
	uint64_t ino;
};

static int do_gstat(int fd, struct gstat *g)
{
	LOCKED_SFD(fd, sfd);
	unsigned char b[STAT_SIZE];
	size_t n = 0;
	uint64_t args[5] = {(uint64_t)sfd};
	long r = call_locked(OP_FSTAT, args, NULL, 0, 0, NULL, b, sizeof(b), &n, NULL);
	if (r >= 0 && n != STAT_SIZE) {
		fail_conn();
		r = -EIO;
	}
	pthread_mutex_unlock(&mu);
	if (r < 0)
		return (int)ret(r);
	g->size = (int64_t)get64(b);
	g->blocks = (int64_t)get64(b + 8);
	g->blksize = (int64_t)get64(b + 16);
	g->mode = get32(b + 24);
	g->nlink = get32(b + 28);
	g->ino = get64(b + 32);
	return 0;
}

// fill_stat fills a struct stat (the same layout as struct stat64 on the
// 64-bit targets the shim builds for). Times, st_dev and st_rdev are zero:
// the guest protocol does not carry them.
static int fill_stat(int fd, struct stat *st)
{
	struct gstat g;
	if (do_gstat(fd, &g) < 0)
		return -1;
	memset(st, 0, sizeof(*st));
	st->st_size = g.size;
	st->st_blocks = g.blocks;
	st->st_blksize = g.blksize;
	st->st_mode = g.mode;
	st->st_nlink = g.nlink;
	st->st_ino = g.ino;
	st->st_uid = getuid();
	st->st_gid = getgid();
	return 0;
}

_Static_assert(sizeof(struct stat) == sizeof(struct stat64), "struct stat and stat64 differ");

int fstat(int fd, struct stat *st)
{
	return sentry_fd(fd) < 0 ? REAL(fstat)(fd, st) : fill_stat(fd, st);
}

int fstat64(int fd, struct stat64 *st)
{
	return sentry_fd(fd) < 0 ? REAL(fstat64)(fd, st) : fill_stat(fd, (struct stat *)st);
}

// empty_path reports whether an *at call with path and flags means the fd
// itself.
static int empty_path(const char *path, int flags)
{
	return path != NULL && path[0] == 0 && (flags & AT_EMPTY_PATH);
}

int fstatat(int dirfd, const char *path, struct stat *st, int flags)
{
	if (sentry_fd(dirfd) >= 0 && empty_path(path, flags))
		return fill_stat(dirfd, st);
	return REAL(fstatat)(dirfd, path, st, flags);
}

int fstatat64(int dirfd, const char *path, struct stat64 *st, int flags)
{
	if (sentry_fd(dirfd) >= 0 && empty_path(path, flags))
		return fill_stat(dirfd, (struct stat *)st);
	return REAL(fstatat64)(dirfd, path, st, flags);
}

int __fxstat(int ver, int fd, struct stat *st)
{
	return sentry_fd(fd) < 0 ? REAL(__fxstat)(ver, fd, st) : fill_stat(fd, st);
}

int __fxstat64(int ver, int fd, struct stat64 *st)
{
	return sentry_fd(fd) < 0 ? REAL(__fxstat64)(ver, fd, st) : fill_stat(fd, (struct stat *)st);
}

int __fxstatat(int ver, int dirfd, const char *path, struct stat *st, int flags)
{
	if (sentry_fd(dirfd) >= 0 && empty_path(path, flags))
		return fill_stat(dirfd, st);
	return REAL(__fxstatat)(ver, dirfd, path, st, flags);
}

int __fxstatat64(int ver, int dirfd, const char *path, struct stat64 *st, int flags)
{
	if (sentry_fd(dirfd) >= 0 && empty_path(path, flags))
		return fill_stat(dirfd, (struct stat *)st);
	return REAL(__fxstatat64)(ver, dirfd, path, st, flags);
}

int statx(int dirfd, const char *path, int flags, unsigned int mask, struct statx *sx)
{
	if (sentry_fd(dirfd) < 0 || !empty_path(path, flags))
		return REAL(statx)(dirfd, path, flags, mask, sx);
	struct gstat g;
	if (do_gstat(dirfd, &g) < 0)
		return -1;
	memset(sx, 0, sizeof(*sx));
	sx->stx_mask = STATX_TYPE | STATX_MODE | STATX_NLINK | STATX_UID | STATX_GID | STATX_INO |
		       STATX_SIZE | STATX_BLOCKS;
	sx->stx_blksize = (uint32_t)g.blksize;
	sx->stx_nlink = g.nlink;
	sx->stx_uid = getuid();
	sx->stx_gid = getgid();
	sx->stx_mode = (uint16_t)g.mode;
	sx->stx_ino = g.ino;
	sx->stx_size = (uint64_t)g.size;
	sx->stx_blocks = (uint64_t)g.blocks;
	return 0;
}

// ---- fcntl, dup, close ----

// dup_onto_locked makes host fd hostfd (a fresh host dup of a placeholder)
// the placeholder of a sentry dup of sfd, with FD_CLOEXEC as cloexec says.
// It returns hostfd or -errno; on failure hostfd is closed.
static int dup_onto_locked(int sfd, int hostfd, int cloexec)
{
	long nsfd = simple_locked(OP_FCNTL, sfd, cloexec ? F_DUPFD_CLOEXEC : F_DUPFD, 0, 0);
	if (nsfd < 0) {
		sys_close(hostfd);
		return (int)nsfd;
	}
	if (hostfd >= MAX_FDS) {
		simple_locked(OP_CLOSE, nsfd, 0, 0, 0);
		sys_close(hostfd);
		return -EMFILE;
	}
	int old = sentry_fd(hostfd);
	if (old >= 0)
		simple_locked(OP_CLOSE, old, 0, 0, 0);
	set_map_locked(hostfd, (int)nsfd);
	return hostfd;
}

// move_conn_locked moves the connection away from fd, which the program is
// about to use.
static int move_conn_locked(int fd)
{
	if (conn < 0 || fd != conn)
		return 0;
	int n = sys_fcntl(conn, F_DUPFD_CLOEXEC, conn + 1);
	if (n < 0)
		n = sys_fcntl(conn, F_DUPFD_CLOEXEC, 3);
	if (n < 0)
		return -errno;
	sys_close(conn);
	conn = n;
	return 0;
}

static int do_fcntl(int fd, int cmd, long arg, int (*real)(int, int, ...))
{
	if (fd == conn && fd >= 0) {
		errno = EBADF;
		return -1;
	}
	if (sentry_fd(fd) < 0)
		return real(fd, cmd, arg);
	LOCKED_SFD(fd, sfd);
	long r;
	switch (cmd) {
	case F_DUPFD:
	case F_DUPFD_CLOEXEC: {
		int h = sys_fcntl(fd, cmd, arg);
		if (h < 0) {
			r = -errno;
			break;
		}
		r = dup_onto_locked(sfd, h, cmd == F_DUPFD_CLOEXEC);
		break;
	}
	case F_SETFD:
		r = simple_locked(OP_FCNTL, sfd, F_SETFD, (uint64_t)arg, 0);
		if (r >= 0 && sys_fcntl(fd, F_SETFD, arg) < 0)
			r = -errno;
		break;
	default:
		r = simple_locked(OP_FCNTL, sfd, (uint64_t)cmd, (uint64_t)arg, 0);
	}
	pthread_mutex_unlock(&mu);
	return (int)ret(r);
}

int fcntl(int fd, int cmd, ...)
{
	va_list ap;
	va_start(ap, cmd);
	long arg = va_arg(ap, long);
	va_end(ap);
	return do_fcntl(fd, cmd, arg, REAL(fcntl));
}

int fcntl64(int fd, int cmd, ...)
{
	va_list ap;
	va_start(ap, cmd);
	long arg = va_arg(ap, long);
	va_end(ap);
	return do_fcntl(fd, cmd, arg, REAL(fcntl64) ? REAL(fcntl64) : REAL(fcntl));
}

int close(int fd)
{
	if (fd >= 0 && fd == conn) {
		errno = EBADF;
		return -1;
	}
	if (sentry_fd(fd) < 0)
		return REAL(close)(fd);
	pthread_mutex_lock(&mu);
	int sfd = sentry_fd(fd);
	if (sfd >= 0) {
		set_map_locked(fd, -1);
		simple_locked(OP_CLOSE, sfd, 0, 0, 0);
	}
	pthread_mutex_unlock(&mu);
	return REAL(close)(fd);
}

// close_sentry_range_locked closes (or, with cloexec, marks FD_CLOEXEC) the
// sentry fds behind the placeholders in [first, last].
static void close_sentry_range_locked(unsigned int first, unsigned int last, int cloexec)
{
	for (unsigned int fd = first; fd < (unsigned int)max_ph && fd <= last; fd++) {
		int sfd = sentry_fd((int)fd);
		if (sfd < 0)
			continue;
		if (cloexec) {
			simple_locked(OP_FCNTL, sfd, F_SETFD, FD_CLOEXEC, 0);
		} else {
			set_map_locked((int)fd, -1);
			simple_locked(OP_CLOSE, sfd, 0, 0, 0);
		}
	}
}

int close_range(unsigned int first, unsigned int last, int flags)
{
	if (first > last || (flags & ~(CLOSE_RANGE_CLOEXEC | CLOSE_RANGE_UNSHARE))) {
		errno = EINVAL;
		return -1;
	}
	pthread_mutex_lock(&mu);
	close_sentry_range_locked(first, last, flags & CLOSE_RANGE_CLOEXEC);
	int r;
	if (conn >= 0 && (unsigned int)conn >= first && (unsigned int)conn <= last) {
		// The connection is not the program's: leave it open.
		r = 0;
		if ((unsigned int)conn > first)
			r = REAL(close_range)(first, conn - 1, flags);
		if (r == 0 && (unsigned int)conn < last)
			r = REAL(close_range)(conn + 1, last, flags);
	} else {
		r = REAL(close_range)(first, last, flags);
	}
	pthread_mutex_unlock(&mu);
	return r;
}

void closefrom(int lowfd)
{
	if (lowfd < 0)
		lowfd = 0;
	close_range((unsigned int)lowfd, ~0U, 0);
}

int dup(int fd)
{
	if (fd >= 0 && fd == conn) {
		errno = EBADF;
		return -1;
	}
	if (sentry_fd(fd) < 0)
		return REAL(dup)(fd);
	LOCKED_SFD(fd, sfd);
	int h = sys_fcntl(fd, F_DUPFD, 0);
	long r = h < 0 ? -errno : dup_onto_locked(sfd, h, 0);
	pthread_mutex_unlock(&mu);
	return (int)ret(r);
}

static int do_dup3(int oldfd, int newfd, int flags, int is_dup2)
{
	if ((oldfd >= 0 && oldfd == conn)) {
		errno = EBADF;
		return -1;
	}
	if (sentry_fd(oldfd) < 0 && sentry_fd(newfd) < 0 && (newfd < 0 || newfd != conn))
		return is_dup2 ? REAL(dup2)(oldfd, newfd) : REAL(dup3)(oldfd, newfd, flags);
	pthread_mutex_lock(&mu);
	long r;
	if ((r = move_conn_locked(newfd)) < 0)
		goto out;
	int sfd = sentry_fd(oldfd);
	if (oldfd == newfd) {
		pthread_mutex_unlock(&mu);
		return is_dup2 ? REAL(dup2)(oldfd, newfd) : REAL(dup3)(oldfd, newfd, flags);
	}
	int h = is_dup2 ? REAL(dup2)(oldfd, newfd) : REAL(dup3)(oldfd, newfd, flags);
	if (h < 0) {
		r = -errno;
		goto out;
	}
	if (sfd >= 0) {
		// The host closed what was at newfd; dup_onto closes its
		// sentry fd if it was a placeholder.
		int cloexec = !is_dup2 && (flags & O_CLOEXEC);
		long nsfd = simple_locked(OP_FCNTL, sfd, cloexec ? F_DUPFD_CLOEXEC : F_DUPFD, 0, 0);
		if (nsfd < 0) {
			int old = sentry_fd(h);
			if (old >= 0) {
				set_map_locked(h, -1);
				simple_locked(OP_CLOSE, old, 0, 0, 0);
			}
			sys_close(h);
			r = nsfd;
			goto out;
		}
		int old = sentry_fd(h);
		if (old >= 0)
			simple_locked(OP_CLOSE, old, 0, 0, 0);
		set_map_locked(h, (int)nsfd);
	} else {
		// A host fd replaced a placeholder.
		int old = sentry_fd(h);
		if (old >= 0) {
			set_map_locked(h, -1);
			simple_locked(OP_CLOSE, old, 0, 0, 0);
		}
	}
	r = h;
out:
	pthread_mutex_unlock(&mu);
	return (int)ret(r);
}

int dup2(int oldfd, int newfd) { return do_dup3(oldfd, newfd, 0, 1); }

int dup3(int oldfd, int newfd, int flags) { return do_dup3(oldfd, newfd, flags, 0); }

// ---- ioctl ----

// luo_ioctl_locked is a LUO ioctl on a placeholder: the argument struct
// goes as bytes, fds inside it are translated both ways.
static long luo_ioctl_locked(int sfd, unsigned long req, unsigned char *arg)
{
	unsigned int nr = req & 0xff;
	if (arg == NULL)
		return -EFAULT;
	uint32_t usize = get32(arg);
	size_t n = usize < 4 ? 4 : usize;
	if (n > MAX_SMALL_PAYLOAD)
		n = MAX_SMALL_PAYLOAD;
	unsigned char buf[MAX_SMALL_PAYLOAD];
	memcpy(buf, arg, n);
	if (nr == LUO_PRESERVE_FD && n >= LUO_PRESERVE_FD_SIZE) {
		int fd = (int)get32(buf + 4);
		int s = sentry_fd(fd);
		if (s < 0 && fd >= 0 && fd != conn && sys_fcntl(fd, F_GETFD, 0) >= 0) {
			// A host file: no LUO file handler can preserve it.
			return -ENOENT;
		}
		put32(buf + 4, (uint32_t)s);
	}
	struct iovec v = {.iov_base = buf, .iov_len = n};
	uint64_t args[5] = {(uint64_t)sfd, (uint32_t)req};
	unsigned char reply[MAX_REPLY_PAYLOAD];
	size_t rn = 0;
	long r = call_locked(OP_IOCTL, args, &v, 1, n, NULL, reply, sizeof(reply), &rn, NULL);
	if (r < 0)
		return r;
	if (rn > n)
		rn = n;
	int outfd = nr == LUO_CREATE_SESSION || nr == LUO_RETRIEVE_SESSION || nr == LUO_RETRIEVE_FD;
	if (outfd && rn >= 8) {
		int ph = adopt_locked((int)get32(reply + 4));
		if (ph < 0)
			return ph;
		put32(reply + 4, (uint32_t)ph);
	}
	memcpy(arg, reply, rn);
	return r;
}

int ioctl(int fd, unsigned long req, ...)
{
	va_list ap;
	va_start(ap, req);
	void *arg = va_arg(ap, void *);
	va_end(ap);
	if (sentry_fd(fd) < 0)
		return REAL(ioctl)(fd, req, arg);
	LOCKED_SFD(fd, sfd);
	long r;
	if (((req >> 8) & 0xff) == LUO_TYPE && _IOC_SIZE(req) == 0) {
		r = luo_ioctl_locked(sfd, req, arg);
	} else {
		// Any other command: _IOC_SIZE bytes go in (write direction)
		// and come back (read direction), as the number says.
		size_t n = _IOC_SIZE(req);
		unsigned char buf[MAX_SMALL_PAYLOAD];
		if (n > sizeof(buf))
			n = sizeof(buf);
		if (arg == NULL || _IOC_DIR(req) == _IOC_NONE)
			n = 0;
		if (n && (_IOC_DIR(req) & _IOC_WRITE))
			memcpy(buf, arg, n);
		else
			memset(buf, 0, n);
		struct iovec v = {.iov_base = buf, .iov_len = n};
		uint64_t args[5] = {(uint64_t)sfd, (uint32_t)req};
		unsigned char reply[MAX_REPLY_PAYLOAD];
		size_t rn = 0;
		r = call_locked(OP_IOCTL, args, &v, 1, n, NULL, reply, sizeof(reply), &rn, NULL);
		if (r >= 0 && (_IOC_DIR(req) & _IOC_READ) && arg != NULL)
			memcpy(arg, reply, rn < n ? rn : n);
		if (r >= 0 && (req == FIOCLEX || req == FIONCLEX))
			REAL(ioctl)(fd, req, arg);
	}
	pthread_mutex_unlock(&mu);
	return (int)ret(r);
}

// ---- mappings ----

static int add_mapping_locked(uintptr_t addr, uintptr_t len, uint64_t id, int may_write)
{
	if (nmaps == capmaps) {
		size_t nc = capmaps ? capmaps * 2 : 16;
		struct mapping *m = realloc(maps, nc * sizeof(*m));
		if (m == NULL)
			return -ENOMEM;
		maps = m;
		capmaps = nc;
	}
	maps[nmaps++] = (struct mapping){addr, len, id, may_write};
	return 0;
}

// unpin_locked tells the sentry that [addr, addr+len) is no longer
// mapped: every sentry mapping overlapping it unpins those pages, and one
// the range covers entirely is forgotten.
static void unpin_locked(uintptr_t addr, uintptr_t len)
{
	size_t keep = 0;
	for (size_t i = 0; i < nmaps; i++) {
		struct mapping m = maps[i];
		if (m.addr < addr + len && addr < m.addr + m.len) {
			uintptr_t s = addr > m.addr ? addr : m.addr;
			uintptr_t t = addr + len < m.addr + m.len ? addr + len : m.addr + m.len;
			simple_locked(OP_MUNMAP, m.id, (s - m.addr) / PAGE, (t - s) / PAGE, 0);
			if (addr <= m.addr && m.addr + m.len <= addr + len)
				continue;
		}
		maps[keep++] = m;
	}
	nmaps = keep;
}

static void *do_mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off,
		     void *(*real)(void *, size_t, int, int, int, off_t))
{
	if ((flags & MAP_ANONYMOUS) || sentry_fd(fd) < 0) {
		void *p = real(addr, len, prot, flags, fd, off);
		if (p != MAP_FAILED && (flags & MAP_FIXED) && __atomic_load_n(&nmaps, __ATOMIC_RELAXED)) {
			pthread_mutex_lock(&mu);
			unpin_locked((uintptr_t)p, (len + PAGE - 1) & ~(PAGE - 1));
			pthread_mutex_unlock(&mu);
		}
		return p;
	}
	pthread_mutex_lock(&mu);
	int sfd = sentry_fd(fd);
	if (sfd < 0) {
		pthread_mutex_unlock(&mu);
		errno = EBADF;
		return MAP_FAILED;
	}
	uint64_t args[5] = {(uint64_t)sfd, (uint64_t)off, len, (uint64_t)prot, (uint64_t)flags};
	struct sink s = {.cap = (len / PAGE + 1) * RUN_SIZE};
	unsigned char reply[8];
	size_t rn = 0;
	int mem = -1;
	long id = call_locked(OP_MMAP, args, NULL, 0, 0, &s, reply, sizeof(reply), &rn, &mem);
	void *result = MAP_FAILED;
	int err = 0;
	if (id < 0) {
		err = (int)-id;
		goto out;
	}
	if (mem < 0 || rn != 8 || s.got % RUN_SIZE != 0) {
		fail_conn();
		err = EIO;
		goto out;
	}
	size_t size = (len + PAGE - 1) & ~(PAGE - 1);
	// Reserve the whole range, then map each run of the memory file
	// over it; pages without a run (past the end of the file) stay
	// PROT_NONE.
	int reserve = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE |
		      (flags & (MAP_FIXED | MAP_FIXED_NOREPLACE));
	void *base = REAL(mmap)(addr, size, PROT_NONE, reserve, -1, 0);
	if (base == MAP_FAILED) {
		err = errno;
		simple_locked(OP_MUNMAP, (uint64_t)id, 0, size / PAGE, 0);
		goto out;
	}
	if (flags & MAP_FIXED)
		unpin_locked((uintptr_t)base, size);
	int kind = (flags & MAP_TYPE) == MAP_PRIVATE ? MAP_PRIVATE : MAP_SHARED;
	kind |= MAP_FIXED | (flags & (MAP_POPULATE | MAP_NORESERVE | MAP_LOCKED));
	for (size_t i = 0; i < s.got; i += RUN_SIZE) {
		uint64_t moff = get64(s.buf + i), foff = get64(s.buf + i + 8), rlen = get64(s.buf + i + 16);
		if (moff % PAGE || foff % PAGE || rlen % PAGE || rlen == 0 || moff >= size ||
		    rlen > size - moff) {
			fail_conn();
			err = EIO;
		} else if (REAL(mmap)((char *)base + moff, rlen, prot, kind, mem, (off_t)foff) == MAP_FAILED) {
			err = errno;
		}
		if (err) {
			REAL(munmap)(base, size);
			simple_locked(OP_MUNMAP, (uint64_t)id, 0, size / PAGE, 0);
			goto out;
		}
	}
	if (add_mapping_locked((uintptr_t)base, size, (uint64_t)id, get64(reply) & MMAP_MAY_WRITE) < 0) {
		REAL(munmap)(base, size);
		simple_locked(OP_MUNMAP, (uint64_t)id, 0, size / PAGE, 0);
		err = ENOMEM;
		goto out;
	}
	result = base;
out:
	if (mem >= 0)
		sys_close(mem);
	free(s.buf);
	pthread_mutex_unlock(&mu);
	if (err)
		errno = err;
	return result;
}

void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
	return do_mmap(addr, len, prot, flags, fd, off, REAL(mmap));
}

void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
	return do_mmap(addr, len, prot, flags, fd, off, REAL(mmap64) ? REAL(mmap64) : REAL(mmap));
}

int munmap(void *addr, size_t len)
{
	int r = REAL(munmap)(addr, len);
	if (r == 0 && __atomic_load_n(&nmaps, __ATOMIC_RELAXED)) {
		pthread_mutex_lock(&mu);
		unpin_locked((uintptr_t)addr, (len + PAGE - 1) & ~(PAGE - 1));
		pthread_mutex_unlock(&mu);
	}
	return r;
}

int mprotect(void *addr, size_t len, int prot)
{
	if ((prot & PROT_WRITE) && __atomic_load_n(&nmaps, __ATOMIC_RELAXED)) {
		// A shared mapping of a write-sealed memfd may not become
		// writable (VM_MAYWRITE is clear): EACCES, as Linux says.
		pthread_mutex_lock(&mu);
		uintptr_t a = (uintptr_t)addr;
		int deny = 0;
		for (size_t i = 0; i < nmaps; i++)
			if (!maps[i].may_write && maps[i].addr < a + len && a < maps[i].addr + maps[i].len)
				deny = 1;
		pthread_mutex_unlock(&mu);
		if (deny) {
			errno = EACCES;
			return -1;
		}
	}
	return REAL(mprotect)(addr, len, prot);
}

// msync needs nothing of the sentry: a sentry memfd's mapping shares its
// pages with the file, so libc's msync (argument checks only) is right.

// ---- fork ----

pid_t fork(void)
{
	pthread_mutex_lock(&mu);
	long token = 0;
	if (conn >= 0 && !broken) {
		token = simple_locked(OP_FORK, 0, 0, 0, 0);
		if (token < 0) {
			pthread_mutex_unlock(&mu);
			errno = (int)-token;
			return -1;
		}
	}
	pid_t pid = REAL(fork)();
	if (pid != 0) {
		// The parent, or a failed fork (the sentry's copy expires
		// unattached).
		pthread_mutex_unlock(&mu);
		return pid;
	}
	// The child: only async-signal-safe calls until it returns.
	pthread_mutex_t fresh = PTHREAD_MUTEX_INITIALIZER;
	memcpy(&mu, &fresh, sizeof(mu));
	if (token > 0) {
		int parent = conn;
		conn = -1;
		sys_close(parent);
		if (dial_locked() < 0 || simple_locked(OP_ATTACH, (uint64_t)token, 0, 0, 0) < 0) {
			// Without its copy the child cannot reach its
			// sentry fds: calls on them answer EIO.
			if (conn >= 0)
				sys_close(conn);
			conn = -1;
			broken = 1;
			static const char msg[] = "livesentry shim: the forked child could not attach to the sentry\n";
			(void)!syscall(SYS_write, 2, msg, sizeof(msg) - 1);
		}
	}
	return 0;
}

pid_t vfork(void) { return fork(); }

// ---- exec ----

// exec_env builds the environment for an exec: envp with our state
// variable added (and LD_PRELOAD and the socket kept if envp dropped
// them). The connection fd is made inheritable. It returns the new envp in
// an anonymous mapping, or NULL (errno set). Called with mu held.
static char **exec_env_locked(char *const envp[], size_t *maplen)
{
	if (conn < 0 || broken)
		return (char **)envp;
	size_t nenv = 0;
	while (envp && envp[nenv])
		nenv++;
	size_t state = 64 + (size_t)max_ph * 24;
	size_t total = (nenv + 4) * sizeof(char *) + state + 2 * PATH_MAX + 64;
	total = (total + PAGE - 1) & ~(PAGE - 1);
	char *m = REAL(mmap)(NULL, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (m == MAP_FAILED)
		return NULL;
	char **out = (char **)m;
	char *p = m + (nenv + 4) * sizeof(char *);
	char *end = m + total;
	size_t k = 0;
	int have_preload = 0, have_sock = 0;
	for (size_t i = 0; i < nenv; i++) {
		if (strncmp(envp[i], ENV_STATE "=", sizeof(ENV_STATE)) == 0)
			continue;
		if (strncmp(envp[i], "LD_PRELOAD=", 11) == 0)
			have_preload = 1;
		if (strncmp(envp[i], ENV_SOCKET "=", sizeof(ENV_SOCKET)) == 0)
			have_sock = 1;
		out[k++] = envp[i];
	}
	out[k++] = p;
	p += snprintf(p, end - p, "%s=%d;", ENV_STATE, conn);
	int first = 1;
	for (int fd = 0; fd < max_ph; fd++) {
		int s = sentry_fd(fd);
		if (s < 0)
			continue;
		p += snprintf(p, end - p, "%s%d:%d", first ? "" : ",", fd, s);
		first = 0;
	}
	p++;
	if (!have_sock) {
		out[k++] = p;
		p += snprintf(p, end - p, "%s=%s", ENV_SOCKET, sock_path) + 1;
	}
	Dl_info info;
	if (!have_preload && dladdr((void *)exec_env_locked, &info) && info.dli_fname) {
		out[k++] = p;
		p += snprintf(p, end - p, "LD_PRELOAD=%s", info.dli_fname) + 1;
	}
	out[k] = NULL;
	*maplen = total;
	sys_fcntl(conn, F_SETFD, 0);
	return out;
}

// exec_undo_locked restores what exec_env_locked changed after a failed
// exec.
static void exec_undo_locked(char **env, char *const envp[], size_t maplen)
{
	if (env == (char **)envp)
		return;
	int e = errno;
	sys_fcntl(conn, F_SETFD, FD_CLOEXEC);
	REAL(munmap)(env, maplen);
	errno = e;
}

int execve(const char *path, char *const argv[], char *const envp[])
{
	pthread_mutex_lock(&mu);
	size_t ml = 0;
	char **env = exec_env_locked(envp, &ml);
	if (env == NULL) {
		pthread_mutex_unlock(&mu);
		return -1;
	}
	int r = REAL(execve)(path, argv, env);
	exec_undo_locked(env, envp, ml);
	pthread_mutex_unlock(&mu);
	return r;
}

int execvpe(const char *file, char *const argv[], char *const envp[])
{
	pthread_mutex_lock(&mu);
	size_t ml = 0;
	char **env = exec_env_locked(envp, &ml);
	if (env == NULL) {
		pthread_mutex_unlock(&mu);
		return -1;
	}
	int r = REAL(execvpe)(file, argv, env);
	exec_undo_locked(env, envp, ml);
	pthread_mutex_unlock(&mu);
	return r;
}

int fexecve(int fd, char *const argv[], char *const envp[])
{
	pthread_mutex_lock(&mu);
	size_t ml = 0;
	char **env = exec_env_locked(envp, &ml);
	if (env == NULL) {
		pthread_mutex_unlock(&mu);
		return -1;
	}
	int r = REAL(fexecve)(fd, argv, env);
	exec_undo_locked(env, envp, ml);
	pthread_mutex_unlock(&mu);
	return r;
}

int execv(const char *path, char *const argv[]) { return execve(path, argv, environ); }

int execvp(const char *file, char *const argv[]) { return execvpe(file, argv, environ); }

// collect_args gathers an execl-style argument list; it returns NULL for
// too many arguments (E2BIG).
#define COLLECT_ARGS(arg0, argv, ap)                                       \
	char *argv[4096];                                                  \
	{                                                                  \
		size_t n_ = 0;                                             \
		argv[n_++] = (char *)(arg0);                               \
		while (argv[n_ - 1] != NULL) {                             \
			if (n_ == 4096) {                                  \
				va_end(ap);                                \
				errno = E2BIG;                             \
				return -1;                                 \
			}                                                  \
			argv[n_++] = va_arg(ap, char *);                   \
		}                                                          \
	}

int execl(const char *path, const char *arg, ...)
{
	va_list ap;
	va_start(ap, arg);
	COLLECT_ARGS(arg, argv, ap);
	va_end(ap);
	return execve(path, argv, environ);
}

int execlp(const char *file, const char *arg, ...)
{
	va_list ap;
	va_start(ap, arg);
	COLLECT_ARGS(arg, argv, ap);
	va_end(ap);
	return execvpe(file, argv, environ);
}

int execle(const char *path, const char *arg, ...)
{
	va_list ap;
	va_start(ap, arg);
	COLLECT_ARGS(arg, argv, ap);
	char *const *envp = va_arg(ap, char *const *);
	va_end(ap);
	return execve(path, argv, envp);
}

// ---- start-up ----

// take_over reads the state a shimmed program left before exec'ing this
// image: the connection and the placeholders that survived the exec (the
// host closed the FD_CLOEXEC ones). It then tells the sentry, which closes
// its FD_CLOEXEC fds and drops the old image's mappings.
static void take_over(const char *state)
{
	char *end;
	long c = strtol(state, &end, 10);
	if (end == state || *end != ';' || c < 0 || sys_fcntl((int)c, F_GETFD, 0) < 0)
		return;
	struct stat null_st;
	if (stat("/dev/null", &null_st) < 0)
		return;
	conn = (int)c;
	sys_fcntl(conn, F_SETFD, FD_CLOEXEC);
	const char *p = end + 1;
	while (*p) {
		long ph = strtol(p, &end, 10);
		if (end == p || *end != ':')
			break;
		p = end + 1;
		long sfd = strtol(p, &end, 10);
		if (end == p)
			break;
		p = *end == ',' ? end + 1 : end;
		struct stat st;
		if (ph < 0 || ph >= MAX_FDS || syscall(SYS_fstat, (int)ph, &st) < 0 ||
		    st.st_rdev != null_st.st_rdev || !S_ISCHR(st.st_mode))
			continue;
		int cloexec = sys_fcntl((int)ph, F_GETFD, 0) & FD_CLOEXEC;
		if (cloexec)
			continue;
		set_map_locked((int)ph, (int)sfd);
	}
	if (simple_locked(OP_EXECVE, 0, 0, 0, 0) < 0) {
		static const char msg[] = "livesentry shim: could not take over the connection after exec\n";
		(void)!syscall(SYS_write, 2, msg, sizeof(msg) - 1);
	}
}

// shim_fini closes the process's sentry fds when it exits normally, so
// that the sentry has closed them (a session unpreserved, /dev/liveupdate
// free again) by the time a parent's wait returns, as Linux has at exit.
// Without it the sentry would close them once it noticed the connection's
// end, some time later.
static void __attribute__((destructor)) shim_fini(void)
{
	pthread_mutex_lock(&mu);
	if (conn >= 0 && !broken)
		close_sentry_range_locked(0, ~0U, 0);
	pthread_mutex_unlock(&mu);
}

// wait_at_start_gate waits at the start gate named by ENV_START_FD, if
// any (pkg/abi/guest: EnvStartFD): a transfer restart's new sentry starts
// the entrypoint's next life before the pause, and the program's own code
// runs only once the sentry opens the gate, after the previous life's
// guests are gone. The gate's end without it means the restart did not
// happen: the process exits. The variable is removed, for the program's
// children.
static void wait_at_start_gate(void)
{
	const char *v = getenv(ENV_START_FD);
	if (v == NULL)
		return;
	char *end;
	long fd = strtol(v, &end, 10);
	unsetenv(ENV_START_FD);
	static const char bad[] = "livesentry shim: " ENV_START_FD " is not an fd: exiting\n";
	static const char closed[] = "livesentry shim: the sentry closed the start gate without opening it (the restart did not complete): exiting\n";
	if (*v == 0 || *end != 0 || fd < 0 || fd > INT_MAX) {
		syscall(SYS_write, 2, bad, sizeof(bad) - 1);
		_exit(1);
	}
	unsigned char c = START_GATE_WAITING;
	long n;
	do
		n = syscall(SYS_write, (int)fd, &c, 1);
	while (n < 0 && errno == EINTR);
	if (n == 1) {
		do
			n = syscall(SYS_read, (int)fd, &c, 1);
		while (n < 0 && errno == EINTR);
	}
	sys_close((int)fd);
	if (n != 1 || c != START_GATE_OPEN) {
		syscall(SYS_write, 2, closed, sizeof(closed) - 1);
		_exit(1);
	}
}

static void __attribute__((constructor(102))) shim_init(void)
{
	wait_at_start_gate();
	const char *s = getenv(ENV_SOCKET);
	if (s != NULL && strlen(s) < sizeof(sock_path))
		memcpy(sock_path, s, strlen(s) + 1);
	const char *state = getenv(ENV_STATE);
	if (state != NULL) {
		pthread_mutex_lock(&mu);
		take_over(state);
		pthread_mutex_unlock(&mu);
		// Not for this image's children.
		unsetenv(ENV_STATE);
	}
}
