/*
 * C declarations of the Live Update Orchestrator user-space ABI
 * (<linux/liveupdate.h>, Linux 7.3), read by cffi at import time.
 *
 * cffi parses declarations only: the ioctl request numbers, _IO(type, nr),
 * are computed in liveupdate/_abi.py from the type and the command numbers
 * declared here. Every argument struct starts with a u32 holding its own
 * size, which the kernel uses to tell old callers from new ones.
 */

#define LIVEUPDATE_IOCTL_TYPE 0xBA

/* Longest session name the kernel stores, counting its terminating NUL. */
#define LIVEUPDATE_SESSION_NAME_LENGTH 64

/* The first command number of each file: the kernel indexes its table of
 * device commands by (nr - LIVEUPDATE_CMD_BASE), of session commands by
 * (nr - LIVEUPDATE_CMD_SESSION_BASE). */
#define LIVEUPDATE_CMD_BASE 0x00
#define LIVEUPDATE_CMD_SESSION_BASE 0x40

/* Commands understood by /dev/liveupdate itself. */
enum liveupdate_device_cmd {
    LIVEUPDATE_CMD_CREATE_SESSION = 0x00,
    LIVEUPDATE_CMD_RETRIEVE_SESSION = 0x01,
};

/* Commands understood by a session file descriptor. */
enum liveupdate_session_cmd {
    LIVEUPDATE_CMD_SESSION_PRESERVE_FD = 0x40,
    LIVEUPDATE_CMD_SESSION_RETRIEVE_FD = 0x41,
    LIVEUPDATE_CMD_SESSION_FINISH = 0x42,
    LIVEUPDATE_CMD_SESSION_GET_NAME = 0x43,
};

/* size: in; fd: out (the new session, O_CLOEXEC); name: in, NUL-terminated. */
struct liveupdate_ioctl_create_session {
    uint32_t size;
    int32_t fd;
    uint8_t name[64];
};

/* Same shape as create: asks for a session handed over by the previous kernel. */
struct liveupdate_ioctl_retrieve_session {
    uint32_t size;
    int32_t fd;
    uint8_t name[64];
};

/* size: in; fd: in (the file to keep); token: in (the caller's key for it). */
struct liveupdate_session_preserve_fd {
    uint32_t size;
    int32_t fd;
    uint64_t token;
};

/* size: in; fd: out (a new file for the token); token: in. */
struct liveupdate_session_retrieve_fd {
    uint32_t size;
    int32_t fd;
    uint64_t token;
};

/* reserved must be zero. */
struct liveupdate_session_finish {
    uint32_t size;
    uint32_t reserved;
};

/* reserved must be zero; name: out, the session's full name. */
struct liveupdate_session_get_name {
    uint32_t size;
    uint32_t reserved;
    uint8_t name[64];
};
