/* The /dev/liveupdate uapi as the selftests use it: the layout of
 * include/uapi/linux/liveupdate.h (every ioctl is _IO(0xBA, nr); the first
 * u32 of each argument is its size as userspace knows it). Written here
 * because the host's kernel headers may predate it. */
#ifndef LIVESENTRY_SELFTESTS_LUO_UAPI_H
#define LIVESENTRY_SELFTESTS_LUO_UAPI_H

#include <linux/ioctl.h>
#include <linux/types.h>

#define LIVEUPDATE_IOCTL_TYPE 0xBA
#define LIVEUPDATE_SESSION_NAME_LENGTH 64

struct liveupdate_ioctl_create_session {
	__u32 size;
	__s32 fd; /* out */
	__u8 name[LIVEUPDATE_SESSION_NAME_LENGTH];
};

struct liveupdate_ioctl_retrieve_session {
	__u32 size;
	__s32 fd; /* out */
	__u8 name[LIVEUPDATE_SESSION_NAME_LENGTH];
};

struct liveupdate_session_preserve_fd {
	__u32 size;
	__s32 fd;
	__aligned_u64 token;
};

struct liveupdate_session_retrieve_fd {
	__u32 size;
	__s32 fd; /* out */
	__aligned_u64 token;
};

struct liveupdate_session_finish {
	__u32 size;
	__u32 reserved;
};

struct liveupdate_session_get_name {
	__u32 size;
	__u32 reserved;
	__u8 name[LIVEUPDATE_SESSION_NAME_LENGTH]; /* out */
};

#define LIVEUPDATE_IOCTL_CREATE_SESSION _IO(LIVEUPDATE_IOCTL_TYPE, 0x00)
#define LIVEUPDATE_IOCTL_RETRIEVE_SESSION _IO(LIVEUPDATE_IOCTL_TYPE, 0x01)
#define LIVEUPDATE_SESSION_PRESERVE_FD _IO(LIVEUPDATE_IOCTL_TYPE, 0x40)
#define LIVEUPDATE_SESSION_RETRIEVE_FD _IO(LIVEUPDATE_IOCTL_TYPE, 0x41)
#define LIVEUPDATE_SESSION_FINISH _IO(LIVEUPDATE_IOCTL_TYPE, 0x42)
#define LIVEUPDATE_SESSION_GET_NAME _IO(LIVEUPDATE_IOCTL_TYPE, 0x43)

_Static_assert(sizeof(struct liveupdate_ioctl_create_session) == 72, "create_session is 72 bytes");
_Static_assert(sizeof(struct liveupdate_session_preserve_fd) == 16, "preserve_fd is 16 bytes");
_Static_assert(sizeof(struct liveupdate_session_finish) == 8, "finish is 8 bytes");
_Static_assert(sizeof(struct liveupdate_session_get_name) == 72, "get_name is 72 bytes");

#endif
