/* A plain program's memfd, filled through a shared mapping, crosses a live
 * update: stage 1 maps a memfd, writes a pattern through the mapping and
 * preserves it; stage 2 retrieves it, maps it and verifies every byte
 * through the mapping, then writes through the mapping and reads back. */
#include "stage.h"

#define SESSION "mmap-restart"
#define STATE_SESSION "mmap-restart-state"
#define TOKEN 0xface
#define SIZE (4 << 20)

static unsigned char pattern(size_t i) { return (unsigned char)((i * 2654435761u) >> 13); }

static void stage_1(int dev)
{
	stage_save_state(dev, STATE_SESSION, 2);
	int s = lu_create_session(dev, SESSION);
	ASSERT_GE(s, 0);
	int m = memfd_create("mapped", MFD_CLOEXEC);
	ASSERT_GE(m, 0);
	ASSERT_EQ(ftruncate(m, SIZE), 0);
	unsigned char *p = mmap(NULL, SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, m, 0);
	ASSERT_TRUE(p != MAP_FAILED);
	for (size_t i = 0; i < SIZE; i++)
		p[i] = pattern(i);
	ASSERT_EQ(munmap(p, SIZE), 0);
	ASSERT_EQ(lu_preserve_fd(s, m, TOKEN), 0);
	stage_pass();
	lu_wait_for_update();
}

static void stage_2(int dev)
{
	stage_check_state(dev, STATE_SESSION, 2);
	int s = lu_retrieve_session(dev, SESSION);
	ASSERT_GE(s, 0);
	int m = lu_retrieve_fd(s, TOKEN);
	ASSERT_GE(m, 0);
	struct stat st;
	ASSERT_EQ(fstat(m, &st), 0);
	ASSERT_EQ(st.st_size, SIZE);
	unsigned char *p = mmap(NULL, SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, m, 0);
	ASSERT_TRUE(p != MAP_FAILED);
	size_t bad = 0;
	for (size_t i = 0; i < SIZE; i++)
		if (p[i] != pattern(i) && bad++ < 5)
			TAP_MSG("byte %zu is %#x, want %#x", i, p[i], pattern(i));
	ASSERT_EQ(bad, 0);
	p[12345] ^= 0xff;
	unsigned char c;
	ASSERT_EQ(pread(m, &c, 1, 12345), 1);
	ASSERT_EQ(c, (unsigned char)(pattern(12345) ^ 0xff));
	ASSERT_EQ(munmap(p, SIZE), 0);
	ASSERT_EQ(lu_finish(s), 0);
	ASSERT_EQ(close(s), 0);
	ASSERT_EQ(close(m), 0);
	printf("# verified %d bytes through the mapping\n", SIZE);
	stage_pass();
}

int main(void)
{
	int n = lu_stage();
	stage_begin("mmap_restart", n);
	int dev = stage_open_dev();
	if (n == 1)
		stage_1(dev);
	else if (n == 2)
		stage_2(dev);
	else
		SKIP("no stage %d", n);
	return tap_failed;
}
