/* Several sessions cross a live update at once: two empty ones, one with a
 * memfd and one with two; stage 2 retrieves all, checks every file and
 * finishes every session. */
#include "stage.h"

#define STATE_SESSION "multi-session-state"

static const struct {
	const char *session;
	int nfiles;
	uint64_t tokens[2];
	const char *data[2];
} sessions[] = {
	{"multi-empty-1", 0, {0}, {0}},
	{"multi-empty-2", 0, {0}, {0}},
	{"multi-files-1", 1, {0x1001}, {"data for session files 1"}},
	{"multi-files-2", 2, {0x2002, 0x3003}, {"first file of session files 2", "second file of session files 2"}},
};
#define NSESSIONS (int)(sizeof(sessions) / sizeof(sessions[0]))

static void stage_1(int dev)
{
	stage_save_state(dev, STATE_SESSION, 2);
	for (int i = 0; i < NSESSIONS; i++) {
		int s = lu_create_session(dev, sessions[i].session);
		ASSERT_GE(s, 0);
		for (int j = 0; j < sessions[i].nfiles; j++) {
			int m = lu_memfd_with("multi", sessions[i].data[j]);
			ASSERT_GE(m, 0);
			ASSERT_EQ(lu_preserve_fd(s, m, sessions[i].tokens[j]), 0);
			/* The session holds the file: its fd may go. */
			ASSERT_EQ(close(m), 0);
		}
	}
	stage_pass();
	lu_wait_for_update();
}

static void stage_2(int dev)
{
	stage_check_state(dev, STATE_SESSION, 2);
	int fds[NSESSIONS];
	/* Retrieve in reverse order: names, not order, identify sessions. */
	for (int i = NSESSIONS - 1; i >= 0; i--) {
		fds[i] = lu_retrieve_session(dev, sessions[i].session);
		ASSERT_GE(fds[i], 0);
	}
	for (int i = 0; i < NSESSIONS; i++) {
		char name[LIVEUPDATE_SESSION_NAME_LENGTH];
		ASSERT_EQ(lu_get_name(fds[i], name, sizeof(name)), 0);
		ASSERT_STREQ(name, sessions[i].session);
		for (int j = 0; j < sessions[i].nfiles; j++) {
			int m = lu_retrieve_fd(fds[i], sessions[i].tokens[j]);
			ASSERT_GE(m, 0);
			ASSERT_TRUE(lu_memfd_holds(m, sessions[i].data[j]));
			ASSERT_EQ(close(m), 0);
		}
		/* A token of another session is not in this one. */
		EXPECT_EQ(lu_retrieve_fd(fds[i], 0x9999), -ENOENT);
	}
	for (int i = 0; i < NSESSIONS; i++) {
		ASSERT_EQ(lu_finish(fds[i]), 0);
		ASSERT_EQ(close(fds[i]), 0);
		EXPECT_EQ(lu_retrieve_session(dev, sessions[i].session), -ENOENT);
	}
	stage_pass();
}

int main(void)
{
	int n = lu_stage();
	stage_begin("multi_session", n);
	int dev = stage_open_dev();
	if (n == 1)
		stage_1(dev);
	else if (n == 2)
		stage_2(dev);
	else
		SKIP("no stage %d", n);
	return tap_failed;
}
