/*
 * C declarations for loading and starting a kexec kernel, read by cffi in
 * ABI mode by liveupdate/kexec.py (added to the binding's ffi through
 * liveupdate._abi.load_cdefs). Nothing here is compiled.
 *
 * The C library has no wrapper for kexec_file_load, so both calls go through
 * the generic syscall() entry point. Every argument of syscall() is passed as
 * a long (the kernel reads each argument from a full register on the
 * architectures listed below), so the Python side casts them all to long.
 */

long syscall(long number, ...);

/* System call numbers (they differ by architecture; generic table on arm64). */
#define SYS_KEXEC_FILE_LOAD_X86_64 320
#define SYS_REBOOT_X86_64 169
#define SYS_KEXEC_FILE_LOAD_AARCH64 294
#define SYS_REBOOT_AARCH64 142

/* Flags of kexec_file_load (<linux/kexec.h>). */
#define KEXEC_FILE_UNLOAD 0x00000001
#define KEXEC_FILE_ON_CRASH 0x00000002
#define KEXEC_FILE_NO_INITRAMFS 0x00000004

/*
 * reboot() only acts when called with both magic numbers; the command then
 * says what to do. CMD_KEXEC jumps into the kernel loaded beforehand.
 */
#define LINUX_REBOOT_MAGIC1 0xfee1dead
#define LINUX_REBOOT_MAGIC2 0x28121969
#define LINUX_REBOOT_CMD_KEXEC 0x45584543
