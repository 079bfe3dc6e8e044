/* Helpers over the /dev/liveupdate uapi and memfds, each returning a fd
 * or 0 on success and -errno on failure, and the two-stage driver the
 * restart tests share. */
#ifndef LIVESENTRY_SELFTESTS_LU_H
#define LIVESENTRY_SELFTESTS_LU_H

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "luo_uapi.h"

#define LIVEUPDATE_DEV "/dev/liveupdate"

static inline int lu_err(int r) { return r < 0 ? -errno : r; }

static inline int lu_session_ioctl(int luo_fd, unsigned long cmd, const char *name)
{
	struct liveupdate_ioctl_create_session a = {.size = sizeof(a)};
	snprintf((char *)a.name, sizeof(a.name), "%s", name);
	if (ioctl(luo_fd, cmd, &a) < 0)
		return -errno;
	return a.fd;
}

static inline int lu_create_session(int luo_fd, const char *name)
{
	return lu_session_ioctl(luo_fd, LIVEUPDATE_IOCTL_CREATE_SESSION, name);
}

static inline int lu_retrieve_session(int luo_fd, const char *name)
{
	return lu_session_ioctl(luo_fd, LIVEUPDATE_IOCTL_RETRIEVE_SESSION, name);
}

static inline int lu_preserve_fd(int session_fd, int fd, uint64_t token)
{
	struct liveupdate_session_preserve_fd a = {.size = sizeof(a), .fd = fd, .token = token};
	return lu_err(ioctl(session_fd, LIVEUPDATE_SESSION_PRESERVE_FD, &a));
}

static inline int lu_retrieve_fd(int session_fd, uint64_t token)
{
	struct liveupdate_session_retrieve_fd a = {.size = sizeof(a), .token = token};
	if (ioctl(session_fd, LIVEUPDATE_SESSION_RETRIEVE_FD, &a) < 0)
		return -errno;
	return a.fd;
}

static inline int lu_finish(int session_fd)
{
	struct liveupdate_session_finish a = {.size = sizeof(a)};
	return lu_err(ioctl(session_fd, LIVEUPDATE_SESSION_FINISH, &a));
}

static inline int lu_get_name(int session_fd, char *buf, size_t len)
{
	struct liveupdate_session_get_name a = {.size = sizeof(a)};
	if (ioctl(session_fd, LIVEUPDATE_SESSION_GET_NAME, &a) < 0)
		return -errno;
	snprintf(buf, len, "%.*s", (int)sizeof(a.name), (char *)a.name);
	return 0;
}

/* lu_nofile raises RLIMIT_NOFILE to at least n. */
static inline int lu_nofile(rlim_t n)
{
	struct rlimit rl;
	if (getrlimit(RLIMIT_NOFILE, &rl) < 0)
		return -errno;
	if (rl.rlim_cur >= n)
		return 0;
	if (rl.rlim_max < n)
		rl.rlim_max = n;
	rl.rlim_cur = n;
	return lu_err(setrlimit(RLIMIT_NOFILE, &rl));
}

/* lu_memfd_with makes a memfd holding data. */
static inline int lu_memfd_with(const char *name, const char *data)
{
	int fd = memfd_create(name, 0);
	if (fd < 0)
		return -errno;
	size_t n = strlen(data);
	if (write(fd, data, n) != (ssize_t)n) {
		int e = errno ? errno : EIO;
		close(fd);
		return -e;
	}
	return fd;
}

/* lu_memfd_holds reports whether fd's contents are exactly data (read from
 * offset 0 with pread, then checked by size through fstat). */
static inline int lu_memfd_holds(int fd, const char *data)
{
	char buf[4096];
	size_t n = strlen(data);
	ssize_t r = pread(fd, buf, sizeof(buf), 0);
	return r == (ssize_t)n && memcmp(buf, data, n) == 0;
}

/* lu_stage is the stage of a two-stage test: 1 after a cold boot, 2 after
 * the first live update, from LIVESENTRY_LIVEUPDATE_NUMBER. */
static inline int lu_stage(void)
{
	const char *s = getenv("LIVESENTRY_LIVEUPDATE_NUMBER");
	return (s ? atoi(s) : 0) + 1;
}

/* lu_wait_for_update ends stage 1: the process keeps its fds (closing a
 * session before the update would unpreserve it) and waits for the live
 * update to stop it. */
static inline void lu_wait_for_update(void)
{
	printf("# stage 1 done: waiting for the live update\n");
	fflush(stdout);
	for (;;)
		pause();
}

#endif
