#!/usr/bin/env python3
"""slowfs: a passthrough FUSE filesystem that sleeps in every metadata operation; read-only
unless --rw.

Why: nightcopy walks mounted filesystems, and restores into them, and on a network filesystem
(NFS, SMB, sshfs, a cloud bucket mount) with cold caches every stat, lookup, directory listing,
create and rename is a round trip. Local disks hide that, so benchmarks and tests mount SOURCE
through slowfs with a fixed delay per operation and count the operations the kernel actually sent
(whatever the tool did).

    slowfs.py SOURCE MOUNTPOINT [--delay-ms 1.0] [--read-delay-ms 0] [--stats FILE]
              [--max-threads 10] [--foreground]
              [--rw [--write-delay-ms 0]]

Needs: PyPI `mfusepy` (tested with 3.1.1), libfuse3 (Debian `fuse3`/`libfuse3-3`), /dev/fuse, root
(or `user_allow_other` in /etc/fuse.conf for allow_other). libfuse 3.14 prints "Ignoring invalid
max threads value 4294967295" at start (libfuse issue #1003): harmless, --max-threads still applies.

Behaviour
- Delay (`--delay-ms`) before getattr, readdir, opendir, open, readlink, access, statfs. In the
  high-level libfuse API a kernel LOOKUP is served by getattr, so lookups are delayed and counted
  as getattr. `read` is not delayed unless `--read-delay-ms` is given (once per read call).
- Mount options: ro (without --rw), multithreaded, use_ino (st_ino is the source's inode),
  attr_timeout=0, entry_timeout=0, negative_timeout=0, default_permissions (the kernel checks mode
  bits against the caller; the daemon itself reads as root), allow_other, fsname=slowfs,
  subtype=slowfs.
- lstat semantics: symlinks are symlinks, FIFOs/sockets/devices keep their type (the kernel serves
  their I/O itself, never the daemon). Regular files: os.open(O_NOFOLLOW) + pread. Errors pass
  through as the source's errno. Names are bytes-exact: mfusepy decodes paths as UTF-8 with
  surrogateescape; this script converts back to bytes explicitly, whatever the locale.
- Always runs in the foreground (`--foreground` is accepted and is the only mode): callers
  background it. Stop it with `umount MOUNTPOINT` (or `fusermount3 -u`): exit status 0. SIGTERM or
  SIGINT also unmount, but exit 1 ("libfuse returned 8"). After a SIGKILL the mount stays
  ("Transport endpoint is not connected"): `umount -l MOUNTPOINT`.
- Cost model: with attr_timeout=0 plus default_permissions the kernel re-fetches the parent
  directory's attributes for every permission check, so `find -printf %s` costs ~3 getattr per
  entry (about 2 without default_permissions): count ops rather than assuming one per file.

Writable (--rw): the same passthrough, writing to SOURCE (usually an empty directory that a
restore fills), without the `ro` mount option. What is delayed, by --delay-ms, is everything a
network filesystem answers with a round trip to its server before the call returns:
- delayed, as above: getattr, readdir, opendir, open, readlink, access, statfs; and create, mknod,
  mkdir, unlink, rmdir, rename (flags such as RENAME_NOREPLACE passed on with renameat2: mfusepy
  itself drops them), link, symlink, chmod, chown, utimens (UTIME_NOW/UTIME_OMIT kept, through
  utimensat), truncate, setxattr, getxattr, listxattr, removexattr, fsync, fsyncdir (both reach
  SOURCE's disk: what the caller asked for).
- not delayed, counted: read and write (data: once per call by --read-delay-ms/--write-delay-ms
  when given), flush (sent on every close(); with no write-back cache each write already reached
  the daemon, so there is nothing left to send), release and releasedir (the kernel sends them
  after close() returns, so a delay there would hold a daemon thread but never the caller).
- not provided (the kernel then answers for itself or the caller gets EOPNOTSUPP/ENOSYS): lock
  and flock (kept by the kernel, local to this host), fallocate, copy_file_range, ioctl, poll.
A created file, directory, node or symlink belongs to the caller (uid/gid of the request) and
gets exactly the mode the kernel sent (the daemon runs with umask 0; the kernel applied the
caller's). libfuse's high-level API answers a create or mkdir with the new entry's attributes by
a getattr of its own (counted and delayed: two operations), and splits one SETATTR that changes
several things (e.g. `touch` on a new file) into one call each (chmod, chown, truncate, utimens).
Readdir skips an entry that is gone before it is stat'ed (a rename under way). Without
--rw none of the write operations exist and the mount is exactly the read-only one above.

Readiness: once the kernel's FUSE_INIT reaches the daemon (the mount exists by then) the script
prints exactly one line `ready` to stdout (flushed), and writes the stats file (generation 1) if
--stats is given. Alternatively poll /proc/self/mountinfo for MOUNTPOINT with type fuse.slowfs.

Stats protocol (--stats FILE): JSON {"generation": N, "pid", "delay_ms", "read_delay_ms",
"write_delay_ms", "writable", "source", "mountpoint", "time", "reason", "ops": {"getattr": n,
"readdir": n, ...}} (ops by the names above), written atomically (FILE.tmp + rename, so readers
never see a partial file).
- SIGUSR1: write the current counters (generation + 1).
- SIGUSR2: reset all counters to zero, then write (generation + 1, all ops 0).
- Exit (umount, SIGTERM/SIGINT): a final write with reason "unmount".
Counts are what the kernel sent; RELEASE/RELEASEDIR arrive asynchronously after close(), so a
snapshot taken right after a command may miss its last release.
A caller reads the current generation G, sends the signal to the slowfs PID (not to a wrapper
shell or sudo), and polls until the file's generation > G. Do not rely on mtime alone: file
timestamps come from the kernel's coarse clock, so two writes within a few ms can share one mtime.
"""

import argparse
import ctypes
import ctypes.util
import errno
import json
import os
import signal
import stat
import sys
import threading
import time
from collections import Counter

import mfusepy as fuse

STAT_KEYS = ('st_mode', 'st_ino', 'st_dev', 'st_nlink', 'st_uid', 'st_gid', 'st_rdev', 'st_size',
             'st_blksize', 'st_blocks')


class SlowFS(fuse.Operations):
    use_ns = True  # times as integer nanoseconds (mfusepy's float seconds lose precision)

    writable = False

    def __init__(self, source, mountpoint, delay, read_delay, stats_path, write_delay=0.0):
        self.root = os.fsencode(os.path.abspath(source)).rstrip(b'/')
        self.source, self.mountpoint = os.path.abspath(source), os.path.abspath(mountpoint)
        self.delay, self.read_delay, self.stats_path = delay, read_delay, stats_path
        self.write_delay = write_delay
        self.ops = Counter()
        # Not `self.lock`: mfusepy registers every attribute named like a FUSE op as that op.
        self.mutex = threading.Lock()
        self.generation = 0

    # -- helpers ----------------------------------------------------------------------------
    def _real(self, path):
        # mfusepy hands us str decoded with utf-8/surrogateescape; undo that byte-exactly.
        return self.root + path.encode('utf-8', 'surrogateescape')

    def _op(self, name, delay=None):
        with self.mutex:
            self.ops[name] += 1
        delay = self.delay if delay is None else delay
        if delay > 0:
            time.sleep(delay)

    def write_stats(self, reason, reset=False):
        if not self.stats_path:
            return
        with self.mutex:
            if reset:
                self.ops.clear()
            self.generation += 1
            doc = {'generation': self.generation, 'pid': os.getpid(), 'reason': reason,
                   'delay_ms': self.delay * 1e3, 'read_delay_ms': self.read_delay * 1e3,
                   'write_delay_ms': self.write_delay * 1e3, 'writable': self.writable,
                   'source': self.source, 'mountpoint': self.mountpoint, 'time': time.time(),
                   'ops': dict(sorted(self.ops.items()))}
            tmp = f'{self.stats_path}.tmp'
            # An explicit mode: the writable daemon runs with umask 0.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            with open(fd, 'w') as f:
                json.dump(doc, f, indent=1)
                f.write('\n')
            os.replace(tmp, self.stats_path)

    # -- lifecycle ----------------------------------------------------------------------------
    def init(self, path):
        self.write_stats('mounted')
        print('ready', flush=True)

    # -- metadata (delayed) ---------------------------------------------------------------------
    def getattr(self, path, fh=None):
        self._op('getattr')
        st = os.lstat(self._real(path))
        attrs = {k: getattr(st, k) for k in STAT_KEYS}
        attrs.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)
        return attrs

    def readlink(self, path):
        self._op('readlink')
        return os.readlink(self._real(path)).decode('utf-8', 'surrogateescape')

    def access(self, path, amode):
        # Not sent by the kernel under default_permissions; kept for completeness. The daemon is
        # root, so os.access would say yes to everything: only check that the name exists.
        self._op('access')
        os.lstat(self._real(path))
        return 0

    def statfs(self, path):
        self._op('statfs')
        sv = os.statvfs(self._real(path))
        return {k: getattr(sv, k) for k in ('f_bsize', 'f_frsize', 'f_blocks', 'f_bfree',
                                            'f_bavail', 'f_files', 'f_ffree', 'f_favail',
                                            'f_flag', 'f_namemax')}

    def opendir(self, path):
        self._op('opendir')
        return os.open(self._real(path), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)

    def readdir(self, path, fh):
        self._op('readdir')
        entries = ['.', '..']
        # libfuse's high-level readdir passes on only the type bits and (with use_ino) st_ino.
        with os.scandir(self._real(path)) as it:
            for e in it:
                st = e.stat(follow_symlinks=False)
                name = e.name.decode('utf-8', 'surrogateescape')
                entries.append((name, {'st_mode': stat.S_IFMT(st.st_mode), 'st_ino': st.st_ino}, 0))
        return entries

    def releasedir(self, path, fh):
        self._op('releasedir', 0)
        os.close(fh)
        return 0

    # -- data -------------------------------------------------------------------------------
    def open(self, path, flags):
        self._op('open')
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise fuse.FuseOSError(errno.EROFS)
        return os.open(self._real(path), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)

    def read(self, path, size, offset, fh):
        self._op('read', self.read_delay)
        return os.pread(fh, size, offset)

    def release(self, path, fh):
        self._op('release', 0)
        os.close(fh)
        return 0


_libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6', use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
AT_FDCWD, AT_SYMLINK_NOFOLLOW = -100, 0x100
UTIME_NOW, UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2


class Timespec(ctypes.Structure):
    _fields_ = [('tv_sec', ctypes.c_long), ('tv_nsec', ctypes.c_long)]


_libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(Timespec), ctypes.c_int]


def _check(ret):
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class WritableSlowFS(SlowFS):
    """--rw: the write side of the passthrough (see the module's docstring for what is delayed)."""

    writable = True

    def _owned(self, path):
        # The daemon is root; what it creates belongs to the caller, as on a local disk.
        uid, gid, _ = fuse.fuse_get_context()
        if (uid, gid) != (os.geteuid(), os.getegid()):
            os.lchown(path, uid, gid)

    def getattr(self, path, fh=None):
        if fh is None:
            return super().getattr(path)
        self._op('getattr')
        st = os.fstat(fh)  # an open file, which may have no name any more
        attrs = {k: getattr(st, k) for k in STAT_KEYS}
        attrs.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)
        return attrs

    def readdir(self, path, fh):
        self._op('readdir')
        entries = ['.', '..']
        with os.scandir(self._real(path)) as it:
            for e in it:
                try:
                    st = e.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # renamed or removed since the listing
                name = e.name.decode('utf-8', 'surrogateescape')
                entries.append((name, {'st_mode': stat.S_IFMT(st.st_mode), 'st_ino': st.st_ino}, 0))
        return entries

    @staticmethod
    def _flags(flags):
        # O_APPEND is left out: the kernel gives every write its offset (pwrite), and O_CREAT,
        # O_EXCL, O_NOCTTY are the kernel's business by now.
        keep = flags & ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_APPEND)
        return keep | os.O_NOFOLLOW | os.O_CLOEXEC

    def open(self, path, flags):
        self._op('open')
        return os.open(self._real(path), self._flags(flags))

    def create(self, path, mode, flags):
        self._op('create')
        real = self._real(path)
        fd = os.open(real, self._flags(flags) | os.O_CREAT | os.O_EXCL, mode)
        self._owned(real)
        return fd

    def write(self, path, data, offset, fh):
        self._op('write', self.write_delay)
        return os.pwrite(fh, data, offset)

    def truncate(self, path, length, fh=None):
        self._op('truncate')
        if fh is not None:
            os.ftruncate(fh, length)
        else:
            os.truncate(self._real(path), length)
        return 0

    def flush(self, path, fh):
        self._op('flush', 0)
        return 0

    def fsync(self, path, datasync, fh):
        self._op('fsync')
        (os.fdatasync if datasync else os.fsync)(fh)
        return 0

    def fsyncdir(self, path, datasync, fh):
        self._op('fsyncdir')
        os.fsync(fh)
        return 0

    def mknod(self, path, mode, dev):
        self._op('mknod')
        real = self._real(path)
        os.mknod(real, mode, dev)
        self._owned(real)
        return 0

    def mkdir(self, path, mode):
        self._op('mkdir')
        real = self._real(path)
        os.mkdir(real, mode)
        self._owned(real)
        return 0

    def unlink(self, path):
        self._op('unlink')
        os.unlink(self._real(path))
        return 0

    def rmdir(self, path):
        self._op('rmdir')
        os.rmdir(self._real(path))
        return 0

    def rename(self, old, new, flags=0):
        self._op('rename')
        _check(_libc.renameat2(AT_FDCWD, self._real(old), AT_FDCWD, self._real(new), flags))
        return 0

    def symlink(self, target, source):
        # mfusepy: `target` is the new link's path, `source` what it points to.
        self._op('symlink')
        real = self._real(target)
        os.symlink(source.encode('utf-8', 'surrogateescape'), real)
        self._owned(real)
        return 0

    def link(self, target, source):
        # mfusepy: `target` is the new name, `source` the existing file.
        self._op('link')
        os.link(self._real(source), self._real(target), follow_symlinks=False)
        return 0

    def chmod(self, path, mode):
        self._op('chmod')
        os.chmod(self._real(path), mode)
        return 0

    def chown(self, path, uid, gid):
        self._op('chown')
        os.lchown(self._real(path), uid, gid)
        return 0

    def utimens(self, path, times=None):
        # `times` is ((atime sec, nsec), (mtime sec, nsec)) from SlowFUSE, with UTIME_NOW and
        # UTIME_OMIT as the kernel sent them; None sets both to now.
        self._op('utimens')
        ts = None
        if times is not None:
            ts = (Timespec * 2)(*(Timespec(sec, nsec) for sec, nsec in times))
        _check(_libc.utimensat(AT_FDCWD, self._real(path), ts, AT_SYMLINK_NOFOLLOW))
        return 0

    def setxattr(self, path, name, value, options, position=0):
        self._op('setxattr')
        os.setxattr(self._real(path), name, value, options, follow_symlinks=False)
        return 0

    def getxattr(self, path, name, position=0):
        self._op('getxattr')
        return os.getxattr(self._real(path), name, follow_symlinks=False)

    def listxattr(self, path):
        self._op('listxattr')
        return os.listxattr(self._real(path), follow_symlinks=False)

    def removexattr(self, path, name):
        self._op('removexattr')
        os.removexattr(self._real(path), name, follow_symlinks=False)
        return 0


class SlowFUSE(fuse.FUSE):
    """mfusepy's FUSE, passing on what it drops: rename's flags, and utimens' UTIME_NOW and
    UTIME_OMIT (it turns them into nanoseconds). Used with --rw only."""

    def rename_fuse_3(self, old, new, flags):
        return self.operations.rename(old.decode(self.encoding, self.errors),
                                      new.decode(self.encoding, self.errors), flags)

    def utimens_fuse_3(self, path, buf, fip):
        times = None
        if buf:
            a, m = buf.contents.actime, buf.contents.modtime
            times = ((a.tv_sec, a.tv_nsec), (m.tv_sec, m.tv_nsec))
        return self.operations.utimens(None if path is None else path.decode(self.encoding, self.errors),
                                       times)


def stats_signal_thread(fs):
    # libfuse's loop keeps the main thread inside C, where Python signal handlers never run, so
    # SIGUSR1/2 are blocked in every thread (workers inherit the mask) and taken here instead.
    while True:
        sig = signal.sigwait({signal.SIGUSR1, signal.SIGUSR2})
        try:
            fs.write_stats('SIGUSR1' if sig == signal.SIGUSR1 else 'SIGUSR2',
                           reset=sig == signal.SIGUSR2)
        except OSError as e:
            print(f'slowfs: cannot write stats: {e}', file=sys.stderr)


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('source')
    p.add_argument('mountpoint')
    p.add_argument('--delay-ms', type=float, default=1.0, help='sleep per metadata op (1.0)')
    p.add_argument('--read-delay-ms', type=float, default=0.0, help='sleep per read call (0)')
    p.add_argument('--stats', help='JSON file for op counters (SIGUSR1: write, SIGUSR2: reset)')
    p.add_argument('--max-threads', type=int, default=10,
                   help="libfuse worker threads (10, libfuse's default): caps concurrent ops")
    p.add_argument('--foreground', action='store_true', help='accepted; always foreground')
    p.add_argument('--rw', action='store_true',
                   help='writable: writes go to SOURCE, write operations delayed too')
    p.add_argument('--write-delay-ms', type=float, default=0.0,
                   help='sleep per write call (0; with --rw)')
    a = p.parse_args()
    if not os.path.isdir(a.source):
        p.error(f'{a.source} is not a directory')
    if a.write_delay_ms and not a.rw:
        p.error('--write-delay-ms needs --rw')
    stats = os.path.abspath(a.stats) if a.stats else None
    if a.rw:
        os.umask(0)  # the kernel already applied the caller's umask to the modes it sends
        fs = WritableSlowFS(a.source, a.mountpoint, a.delay_ms / 1e3, a.read_delay_ms / 1e3,
                            stats, a.write_delay_ms / 1e3)
    else:
        fs = SlowFS(a.source, a.mountpoint, a.delay_ms / 1e3, a.read_delay_ms / 1e3, stats)

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGUSR2})
    threading.Thread(target=stats_signal_thread, args=(fs,), daemon=True).start()
    try:
        (SlowFUSE if a.rw else fuse.FUSE)(
            fs, a.mountpoint, foreground=True, nothreads=False, ro=not a.rw, use_ino=True,
            attr_timeout=0, entry_timeout=0, negative_timeout=0, default_permissions=True,
            allow_other=True, fsname='slowfs', subtype='slowfs', max_threads=a.max_threads)
    except RuntimeError as e:  # libfuse's status: 8 = loop ended by SIGTERM/SIGINT; else no mount
        sys.exit(f'slowfs: libfuse returned {e}')
    finally:
        fs.write_stats('unmount')


if __name__ == '__main__':
    main()
