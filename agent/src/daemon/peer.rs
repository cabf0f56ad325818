//! The local API's callers as the kernel names them, taken when a connection is accepted: the
//! socket's peer credentials (`SO_PEERCRED`) and a pidfd of the peer process
//! (`SO_PEERPIDFD`, kernel 6.5+).
//!
//! The pid in the credentials is a number: the process may have exited and the number gone to
//! another process by the time the agent reads `/proc/<pid>/cgroup`. The pidfd names the
//! process itself, so a caller is checked by reading its cgroup and then confirming through
//! the pidfd that the process is still alive (a live process keeps its pid: nothing read
//! under that number in between belonged to anyone else). Without `SO_PEERPIDFD` (older
//! kernels) the credentials alone are used. A descriptor passed to another process still
//! names the process that connected: that process answers for it.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::UnixStream,
};
use tonic::transport::server::Connected;

/// `SO_PEERPIDFD` (include/uapi/asm-generic/socket.h; not in every libc yet).
const SO_PEERPIDFD: libc::c_int = 77;

/// Who connected.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
    /// The peer process, where the kernel gives it.
    pub pidfd: Option<Arc<OwnedFd>>,
}

impl PeerInfo {
    /// `Some(true)`: the peer process is alive; `Some(false)`: it has exited (its pid may be
    /// someone else's now); `None`: no pidfd to tell.
    pub fn alive(&self) -> Option<bool> {
        Some(pidfd_alive(self.pidfd.as_ref()?))
    }
}

/// Whether the process `pidfd` names is alive (not exited: its pid is still its own).
pub fn pidfd_alive(pidfd: &OwnedFd) -> bool {
    // SAFETY: pidfd_send_signal with signal 0 only checks; the fd is open (borrowed).
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            0,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    r == 0
}

/// A pidfd for `pid` (`None`: no such process).
pub fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    if pid <= 0 {
        return None;
    }
    // SAFETY: pidfd_open with a pid and no flags; a non-negative result is a new fd we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let fd = i32::try_from(fd).ok().filter(|fd| *fd >= 0)?;
    // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An accepted connection of the local API, with its peer.
pub struct PeerStream {
    inner: UnixStream,
    info: PeerInfo,
}

impl PeerStream {
    pub fn new(inner: UnixStream) -> io::Result<Self> {
        let cred = inner.peer_cred()?;
        let pidfd = peer_pidfd(&inner).map(Arc::new);
        Ok(Self {
            info: PeerInfo {
                uid: cred.uid(),
                gid: cred.gid(),
                pid: cred.pid(),
                pidfd,
            },
            inner,
        })
    }
}

fn peer_pidfd(s: &UnixStream) -> Option<OwnedFd> {
    let mut fd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `fd`.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            (&raw mut fd).cast(),
            &mut len,
        )
    };
    // SAFETY: on success the kernel installed a new descriptor that nothing else owns.
    (r == 0 && fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Connected for PeerStream {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn the_peer_is_named_by_a_pidfd_that_tells_when_it_exits() -> io::Result<()> {
        let (a, b) = UnixStream::pair()?;
        let me = PeerStream::new(a)?;
        assert_eq!(me.info.pid, Some(std::process::id() as i32));
        assert_eq!(me.info.alive(), Some(true), "this kernel has SO_PEERPIDFD");
        drop(b);

        // A peer that connected and exited: its pidfd says so.
        let path = std::env::temp_dir().join(format!("corral-peer-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path)?;
        // SAFETY: the child only connects, sleeps and _exits (no allocation-sensitive state
        // of this single-threaded test is touched after the fork).
        let child = unsafe { libc::fork() };
        if child == 0 {
            let s = std::os::unix::net::UnixStream::connect(&path);
            std::thread::sleep(std::time::Duration::from_millis(300));
            drop(s);
            // SAFETY: ends the child without running the parent's destructors.
            unsafe { libc::_exit(0) };
        }
        assert!(child > 0, "fork: {}", io::Error::last_os_error());
        let (conn, _) = listener.accept()?;
        conn.set_nonblocking(true)?;
        let peer = PeerStream::new(UnixStream::from_std(conn)?)?;
        assert_eq!(peer.info.pid, Some(child));
        assert_eq!(peer.info.alive(), Some(true));
        let mut status = 0;
        // SAFETY: waits for our own child.
        unsafe { libc::waitpid(child, &mut status, 0) };
        assert_eq!(peer.info.alive(), Some(false), "the peer exited");
        let _ = std::fs::remove_file(&path);
        Ok(())
    }
}
