/* Preserved memfds within one life: data written through a shared
 * mapping, an empty file, what a preserved (frozen) file refuses, and a
 * file whose space was allocated before it was preserved. */
#include "lu.h"
#include "tap.h"

#define PAGE 4096

static int session(const char *name)
{
	int dev = open(LIVEUPDATE_DEV, O_RDWR);
	if (dev < 0 && errno == ENOENT)
		SKIP("%s does not exist", LIVEUPDATE_DEV);
	ASSERT_GE(dev, 0);
	int s = lu_create_session(dev, name);
	ASSERT_GE(s, 0);
	return s;
}

/* Bytes stored through MAP_SHARED are the file's: read sees them, a
 * second mapping sees them, and preservation keeps them. */
TEST(memfd_data_through_mmap)
{
	int s = session("mmap-data");
	int m = memfd_create("mapped", 0);
	ASSERT_GE(m, 0);
	ASSERT_EQ(ftruncate(m, 4 * PAGE), 0);
	unsigned char *p = mmap(NULL, 4 * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, m, 0);
	ASSERT_TRUE(p != MAP_FAILED);
	for (int i = 0; i < 4 * PAGE; i++)
		p[i] = (unsigned char)(i * 7 + 3);
	ASSERT_EQ(lu_preserve_fd(s, m, 7), 0);
	unsigned char buf[4 * PAGE];
	ASSERT_EQ(pread(m, buf, sizeof(buf), 0), (long)sizeof(buf));
	ASSERT_MEMEQ(buf, p, sizeof(buf));
	unsigned char *q = mmap(NULL, 4 * PAGE, PROT_READ, MAP_SHARED, m, 0);
	ASSERT_TRUE(q != MAP_FAILED);
	ASSERT_MEMEQ(q, p, 4 * PAGE);
	/* A write through read/write shows in the mapping at once. */
	ASSERT_EQ(pwrite(m, "Z", 1, PAGE + 5), 1);
	ASSERT_EQ(p[PAGE + 5], 'Z');
	ASSERT_EQ(q[PAGE + 5], 'Z');
	ASSERT_EQ(munmap(q, 4 * PAGE), 0);
	ASSERT_EQ(munmap(p, 4 * PAGE), 0);
	ASSERT_EQ(close(s), 0);
}

/* An empty memfd is preserved and stays empty. */
TEST(memfd_zero_size)
{
	int s = session("zero-size");
	int m = memfd_create("empty", 0);
	ASSERT_GE(m, 0);
	ASSERT_EQ(lu_preserve_fd(s, m, 1), 0);
	struct stat st;
	ASSERT_EQ(fstat(m, &st), 0);
	ASSERT_EQ(st.st_size, 0);
	char c;
	ASSERT_EQ(read(m, &c, 1), 0);
	ASSERT_EQ(close(s), 0);
}

/* While preserved, a memfd's size is fixed: ftruncate to another size,
 * writes past the end and fallocate are EPERM; writes inside work. Once
 * the session is closed (unpreserved), they work again. */
TEST(memfd_preserved_ops_refused)
{
	int s = session("frozen");
	int m = lu_memfd_with("frozen", "0123456789");
	ASSERT_GE(m, 0);
	ASSERT_EQ(lu_preserve_fd(s, m, 1), 0);
	errno = 0;
	EXPECT_EQ(ftruncate(m, 4 * PAGE), -1);
	EXPECT_EQ(errno, EPERM);
	errno = 0;
	EXPECT_EQ(ftruncate(m, 2), -1);
	EXPECT_EQ(errno, EPERM);
	errno = 0;
	EXPECT_EQ(pwrite(m, "x", 1, 10), -1);
	EXPECT_EQ(errno, EPERM);
	errno = 0;
	EXPECT_EQ(fallocate(m, 0, 0, PAGE), -1);
	EXPECT_EQ(errno, EPERM);
	EXPECT_EQ(ftruncate(m, 10), 0);
	EXPECT_EQ(pwrite(m, "ab", 2, 3), 2);
	ASSERT_TRUE(lu_memfd_holds(m, "012ab56789"));
	ASSERT_EQ(close(s), 0);
	EXPECT_EQ(ftruncate(m, 4 * PAGE), 0);
	EXPECT_EQ(pwrite(m, "x", 1, 4 * PAGE), 1);
}

/* Space allocated before preservation can be written after it: the write
 * lands inside the (already grown) file. */
TEST(memfd_fallocate_preserve_write)
{
	int s = session("fallocated");
	int m = memfd_create("falloc", 0);
	ASSERT_GE(m, 0);
	ASSERT_EQ(fallocate(m, 0, 0, 8 * PAGE), 0);
	struct stat st;
	ASSERT_EQ(fstat(m, &st), 0);
	ASSERT_EQ(st.st_size, 8 * PAGE);
	ASSERT_EQ(lu_preserve_fd(s, m, 1), 0);
	char data[PAGE];
	memset(data, 0x5a, sizeof(data));
	ASSERT_EQ(pwrite(m, data, sizeof(data), 7 * PAGE), PAGE);
	char back[PAGE];
	ASSERT_EQ(pread(m, back, sizeof(back), 7 * PAGE), PAGE);
	ASSERT_MEMEQ(back, data, sizeof(data));
	/* The rest is still zero. */
	ASSERT_EQ(pread(m, back, sizeof(back), 0), PAGE);
	memset(data, 0, sizeof(data));
	ASSERT_MEMEQ(back, data, sizeof(data));
	ASSERT_EQ(close(s), 0);
}

int main(void) { return tap_main(); }
