//! Did the peer get what we wrote? The kernel knows.
//!
//! `TIOCOUTQ` (`SIOCOUTQ`) reports the bytes written to a socket that the
//! other end does not have yet: for a Unix stream socket, those the peer
//! has not *read*; for a TCP socket, those its TCP stack has not
//! *acknowledged* (unsent, or in flight). Nothing better exists for TCP:
//! what the peer acknowledged sits in its receive buffer, and only its
//! application can tell whether it read it before closing.
//!
//! For a Unix socket, zero unread bytes on a connection the peer has not
//! closed means every frame written so far was read by the client. A closing
//! peer frees its unread buffer too, so the hang-up check must come *after*
//! the queue check: a frame is only counted as delivered when the queue was
//! empty while the peer was still there. A peer that read and then closed
//! at that very moment is counted as not delivered — a rare duplicate, never
//! a loss.

#![allow(unsafe_code)]

use std::os::fd::RawFd;

/// How many of the `written` bytes (everything written to `fd` so far)
/// a still-connected peer has — read them (Unix socket) or acknowledged
/// them (TCP); `None` if it closed or the kernel cannot tell. The queue is
/// looked at before the hang-up (see the module doc), and `written` must
/// be loaded before this call: a write in between only makes the answer
/// more cautious.
pub fn consumed(fd: RawFd, written: u64) -> Option<u64> {
    let unread = unread_bytes(fd).filter(|&n| n >= 0)?;
    (!hung_up(fd)).then(|| written.saturating_sub(unread as u64))
}

/// The uid this daemon runs as.
pub fn own_uid() -> u32 {
    rustix::process::getuid().as_raw()
}

/// Bytes written to `fd` that the other end does not have yet (see the
/// module doc), or `None` if the kernel cannot tell.
pub fn unread_bytes(fd: RawFd) -> Option<i32> {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ writes one c_int through the pointer, which points to
    // a live local; `fd` is an open socket owned by the caller.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n) };
    (rc == 0).then_some(n)
}

/// True when the peer of `fd` closed (or the socket failed).
pub fn hung_up(fd: RawFd) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout (never blocks).
    let rc = unsafe { libc::poll(&mut pfd, 1, 0) };
    rc < 0 || pfd.revents & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR | libc::POLLNVAL) != 0
}

/// Makes closing `fd` reset the connection (`SO_LINGER` 0): what its send
/// buffer still holds is dropped, never delivered after the daemon gave up
/// on the peer (a destructive stream released those messages already).
pub fn reset_on_close(fd: RawFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: one valid `linger` passed by pointer with its size; `fd` is
    // an open socket owned by the caller. A failure only leaves the
    // ordinary close.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}
