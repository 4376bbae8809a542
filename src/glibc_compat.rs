//! Definitions of the libc functions glibc 2.17 lacks and corecast's dependencies call, so
//! the release binary links against glibc 2.17 (manylinux2014: CentOS 7, RHEL 7, Ubuntu
//! 14.04 and later) and needs no symbol version newer than GLIBC_2.17.
//!
//! Each function here forwards to the raw system call with the same arguments. Because the
//! binary defines the symbol itself, the linker resolves the dependencies' references to it
//! from this object instead of from libc.so, and no versioned reference to the newer glibc
//! is left (`objdump -T` on the binary shows none; `dist/build.sh` checks the wheel with
//! `auditwheel show`). On a newer glibc the result is the same: glibc's own wrappers of
//! these calls are plain system calls too.
//!
//! Only system calls that every kernel corecast runs on has belong here: corecast needs
//! io_uring from Linux 5.8, and each call below is older (its version is noted). A call the
//! kernel lacked would fail with ENOSYS, as glibc's wrapper does.
//!
//! `libc::syscall` returns -1 and sets `errno` on failure, the contract of the libc
//! functions replaced, so the result is passed through unchanged.
//!
//! The list is what the link with zig against glibc 2.17 reported undefined
//! (`maturin build --zig --compatibility manylinux2014`): a new dependency calling another
//! post-2.17 function makes that link fail with "undefined symbol", and the function is
//! added here the same way.

use libc::{c_int, c_long, c_uint, loff_t, size_t, ssize_t};

/// `copy_file_range(2)` (Linux 4.5, glibc 2.27), called by glommio's blocking thread pool
/// (`DmaFile::copy_file_range_aligned`, which corecast does not use; the reference alone
/// makes the link need it).
///
/// # Safety
/// As for the libc function: `off_in` and `off_out` are null or point to a writable
/// `loff_t`.
#[no_mangle]
pub unsafe extern "C" fn copy_file_range(
    fd_in: c_int,
    off_in: *mut loff_t,
    fd_out: c_int,
    off_out: *mut loff_t,
    len: size_t,
    flags: c_uint,
) -> ssize_t {
    let ret: c_long = libc::syscall(libc::SYS_copy_file_range, fd_in, off_in, fd_out, off_out, len, flags);
    ret as ssize_t
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::fd::AsRawFd;

    /// The forwarded call copies bytes, moves the offsets it is given, and reports an
    /// error through -1 and `errno` (a bad descriptor: EBADF).
    #[test]
    fn copy_file_range_copies_and_reports_errors_through_errno() {
        let dir = std::env::temp_dir().join(format!("corecast-glibc-compat-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut src = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join("src"))
            .unwrap();
        src.write_all(b"0123456789abcdef").unwrap();
        let mut dst = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join("dst"))
            .unwrap();
        let mut off_in: libc::loff_t = 4;
        let mut off_out: libc::loff_t = 0;
        let n = unsafe { super::copy_file_range(src.as_raw_fd(), &mut off_in, dst.as_raw_fd(), &mut off_out, 8, 0) };
        assert_eq!(n, 8);
        assert_eq!((off_in, off_out), (12, 8));
        let mut copied = Vec::new();
        dst.seek(SeekFrom::Start(0)).unwrap();
        dst.read_to_end(&mut copied).unwrap();
        assert_eq!(copied, b"456789ab");

        let n =
            unsafe { super::copy_file_range(-1, std::ptr::null_mut(), dst.as_raw_fd(), std::ptr::null_mut(), 1, 0) };
        assert_eq!(n, -1);
        assert_eq!(std::io::Error::last_os_error().raw_os_error(), Some(libc::EBADF));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
