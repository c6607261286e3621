//! Did the peer consume what we wrote? The kernel knows.
//!
//! For a Unix stream socket, `TIOCOUTQ` reports the bytes we sent that the
//! peer has not read yet. Zero unread bytes on a connection the peer has not
//! closed means every frame written so far was read by the client. A closing
//! peer frees its unread buffer too, so the hang-up check must come *after*
//! the queue check: a frame is only counted as delivered when the queue was
//! empty while the peer was still there. A peer that read and then closed
//! at that very moment is counted as not delivered — a rare duplicate, never
//! a loss.

#![allow(unsafe_code)]

use std::os::fd::RawFd;

/// True when every byte written to `fd` has been read by a still-connected peer.
pub fn consumed_by_live_peer(fd: RawFd) -> bool {
    unread_bytes(fd) == Some(0) && !hung_up(fd)
}

/// The uid this daemon runs as.
pub fn own_uid() -> u32 {
    rustix::process::getuid().as_raw()
}

fn unread_bytes(fd: RawFd) -> Option<i32> {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ writes one c_int through the pointer, which points to
    // a live local; `fd` is an open socket owned by the caller.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n) };
    (rc == 0).then_some(n)
}

fn hung_up(fd: RawFd) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout (never blocks).
    let rc = unsafe { libc::poll(&mut pfd, 1, 0) };
    rc < 0 || pfd.revents & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR | libc::POLLNVAL) != 0
}
