/* One session with one memfd crosses a live update: stage 1 preserves it,
 * stage 2 retrieves it with its contents and finishes the session. */
#include "stage.h"

#define SESSION "kexec-simple"
#define STATE_SESSION "kexec-simple-state"
#define TOKEN 0x1337
#define DATA "kexec_simple: data that crossed the live update"

static void stage_1(int dev)
{
	stage_save_state(dev, STATE_SESSION, 2);
	int s = lu_create_session(dev, SESSION);
	ASSERT_GE(s, 0);
	int m = lu_memfd_with("simple", DATA);
	ASSERT_GE(m, 0);
	ASSERT_EQ(lu_preserve_fd(s, m, TOKEN), 0);
	stage_pass();
	lu_wait_for_update();
}

static void stage_2(int dev)
{
	stage_check_state(dev, STATE_SESSION, 2);
	int s = lu_retrieve_session(dev, SESSION);
	ASSERT_GE(s, 0);
	/* A session is retrieved once. */
	EXPECT_EQ(lu_retrieve_session(dev, SESSION), -EINVAL);
	int m = lu_retrieve_fd(s, TOKEN);
	ASSERT_GE(m, 0);
	ASSERT_TRUE(lu_memfd_holds(m, DATA));
	/* Retrieving the token again gives another fd of the same file, as
	 * Linux does; an unknown token is ENOENT. */
	int again = lu_retrieve_fd(s, TOKEN);
	ASSERT_GE(again, 0);
	ASSERT_NE(again, m);
	ASSERT_EQ(pwrite(again, "K", 1, 0), 1);
	char c = 0;
	ASSERT_EQ(pread(m, &c, 1, 0), 1);
	ASSERT_EQ(c, 'K');
	ASSERT_EQ(pwrite(again, DATA, 1, 0), 1);
	ASSERT_EQ(close(again), 0);
	EXPECT_EQ(lu_retrieve_fd(s, 0x4242), -ENOENT);
	/* The position crossed too: the write in stage 1 left it at the end. */
	EXPECT_EQ(lseek(m, 0, SEEK_CUR), (long)strlen(DATA));
	ASSERT_EQ(lu_finish(s), 0);
	ASSERT_EQ(close(s), 0);
	EXPECT_EQ(lu_retrieve_session(dev, SESSION), -ENOENT);
	ASSERT_TRUE(lu_memfd_holds(m, DATA));
	check_finished_file(dev, m, "kexec-simple-again");
	ASSERT_EQ(close(m), 0);
	stage_pass();
}

int main(void)
{
	int n = lu_stage();
	stage_begin("kexec_simple", n);
	int dev = stage_open_dev();
	if (n == 1)
		stage_1(dev);
	else if (n == 2)
		stage_2(dev);
	else
		SKIP("no stage %d", n);
	return tap_failed;
}
