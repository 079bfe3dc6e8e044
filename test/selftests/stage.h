/* Two-stage tests: stage 1 runs after a cold boot and prepares sessions,
 * then waits with its fds open until the live update stops it; the sandbox
 * relaunches the program and stage 2 retrieves and checks. Each stage
 * prints its own TAP plan of one case; an ASSERT failure ends the stage as
 * "not ok". Like the Linux selftests, stage 1 also preserves a state memfd
 * holding the number of the stage that must come next, which stage 2
 * checks against its own. */
#ifndef LIVESENTRY_SELFTESTS_STAGE_H
#define LIVESENTRY_SELFTESTS_STAGE_H

#include "lu.h"
#include "tap.h"

#define STATE_TOKEN 998

static const char *stage_name;
static int stage_reported;

static void stage_report_failure(void)
{
	if (tap_failed && !stage_reported)
		printf("not ok 1 %s\n", stage_name);
}

/* stage_begin prints the plan of stage n of test and arranges for a
 * failure report. */
static void stage_begin(const char *test, int n)
{
	static char name[128];
	setvbuf(stdout, NULL, _IOLBF, 0);
	snprintf(name, sizeof(name), "%s stage %d", test, n);
	stage_name = name;
	printf("TAP version 13\n1..1\n");
	atexit(stage_report_failure);
}

/* stage_pass ends the stage: ok, or not ok if an EXPECT failed. */
static void stage_pass(void)
{
	printf("%s 1 %s\n", tap_failed ? "not ok" : "ok", stage_name);
	stage_reported = 1;
}

/* stage_save_state makes session state_session holding next, the stage
 * that must run next. */
static void stage_save_state(int dev, const char *state_session, int next)
{
	char b[16];
	snprintf(b, sizeof(b), "%d", next);
	int s = lu_create_session(dev, state_session);
	ASSERT_GE(s, 0);
	int m = lu_memfd_with("state", b);
	ASSERT_GE(m, 0);
	ASSERT_EQ(lu_preserve_fd(s, m, STATE_TOKEN), 0);
}

/* stage_check_state retrieves the state session, checks that it names
 * stage n, and finishes it. */
static void stage_check_state(int dev, const char *state_session, int n)
{
	char want[16];
	snprintf(want, sizeof(want), "%d", n);
	int s = lu_retrieve_session(dev, state_session);
	ASSERT_GE(s, 0);
	int m = lu_retrieve_fd(s, STATE_TOKEN);
	ASSERT_GE(m, 0);
	ASSERT_TRUE(lu_memfd_holds(m, want));
	ASSERT_EQ(lu_finish(s), 0);
	ASSERT_EQ(close(m), 0);
	ASSERT_EQ(close(s), 0);
}

/* stage_open_dev opens /dev/liveupdate or fails the stage. */
static int stage_open_dev(void)
{
	int dev = open(LIVEUPDATE_DEV, O_RDWR);
	ASSERT_GE(dev, 0);
	return dev;
}

/* check_finished_file checks that a memfd retrieved from a finished
 * session is the program's own: no longer frozen (it can change size) and
 * no longer preserved (it can be preserved again). */
static inline void check_finished_file(int dev, int fd, const char *session)
{
	struct stat st;
	ASSERT_EQ(fstat(fd, &st), 0);
	ASSERT_EQ(ftruncate(fd, st.st_size + 4096), 0);
	ASSERT_EQ(ftruncate(fd, st.st_size), 0);
	int s = lu_create_session(dev, session);
	ASSERT_GE(s, 0);
	ASSERT_EQ(lu_preserve_fd(s, fd, 1), 0);
	ASSERT_EQ(close(s), 0);
}

#endif
