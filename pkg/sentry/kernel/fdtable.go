package kernel

import (
	"sync"

	"github.com/livesentry/livesentry/pkg/sentry/vfs"
	"golang.org/x/sys/unix"
)

// MaxFDs is the number of fds a guest process may hold: the default soft
// RLIMIT_NOFILE of Linux. An fd at or above it is EBADF for dup3 and
// F_DUPFD gives EINVAL; running out of fds below it is EMFILE.
const MaxFDs = 1024

// descriptor is one entry of an fd table: the file and the fd's flags.
type descriptor struct {
	// file holds one reference for this fd.
	file vfs.FileDescription
	// statusFlags are the file status flags F_GETFL shows (O_RDWR, ...).
	// Linux keeps them in the open file description, which dup'ed fds
	// share; they never change after open here, so a copy per fd is the
	// same thing.
	statusFlags int
	// cloexec is FD_CLOEXEC.
	cloexec bool
}

// FDTable is a guest process's fd table (struct files_struct): fd numbers
// to file descriptions, each fd with its own FD_CLOEXEC. It implements
// vfs.FDTable, so that LUO's ioctls install session and retrieved fds in
// it. It is safe for concurrent use.
type FDTable struct {
	mu sync.Mutex

	// fds is indexed by fd; an entry with a nil file is free.
	//
	// +checklocks:mu
	fds []descriptor

	// dropped is set by drop: the table is empty and must stay so.
	//
	// +checklocks:mu
	dropped bool
}

// lowestFreeLocked returns the lowest free fd at or above min, or -1.
//
// +checklocks:t.mu
func (t *FDTable) lowestFreeLocked(min int) int {
	for fd := min; fd < len(t.fds); fd++ {
		if t.fds[fd].file == nil {
			return fd
		}
	}
	if n := max(len(t.fds), min); n < MaxFDs {
		return n
	}
	return -1
}

// setLocked puts d at fd and returns what was there.
//
// Preconditions: 0 <= fd < MaxFDs.
//
// +checklocks:t.mu
func (t *FDTable) setLocked(fd int, d descriptor) descriptor {
	for fd >= len(t.fds) {
		t.fds = append(t.fds, descriptor{})
	}
	old := t.fds[fd]
	t.fds[fd] = d
	return old
}

// install puts f at the lowest free fd at or above min with the given
// flags, taking a new reference on f (alloc_fd + fd_install). It fails with
// EMFILE when no fd is free.
func (t *FDTable) install(f vfs.FileDescription, statusFlags int, cloexec bool, min int) (int32, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.dropped {
		return -1, unix.EBADF
	}
	fd := t.lowestFreeLocked(min)
	if fd < 0 {
		return -1, unix.EMFILE
	}
	f.IncRef()
	t.setLocked(fd, descriptor{file: f, statusFlags: statusFlags, cloexec: cloexec})
	return int32(fd), nil
}

// InstallFD installs f at the lowest free fd with f's StatusFlags, taking a
// new reference on f, with FD_CLOEXEC set if cloexec. It implements
// vfs.FDTable.
func (t *FDTable) InstallFD(f vfs.FileDescription, cloexec bool) (int32, error) {
	return t.install(f, f.StatusFlags(), cloexec, 0)
}

// FileFromFD returns the file behind fd with a new reference, which the
// caller drops with DecRef (fget). It implements vfs.FDTable. A bad fd is
// EBADF.
func (t *FDTable) FileFromFD(fd int32) (vfs.FileDescription, error) {
	d, err := t.get(fd)
	if err != nil {
		return nil, err
	}
	return d.file, nil
}

// get returns the descriptor at fd with a new reference on its file.
func (t *FDTable) get(fd int32) (descriptor, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if fd < 0 || int(fd) >= len(t.fds) || t.fds[fd].file == nil {
		return descriptor{}, unix.EBADF
	}
	d := t.fds[fd]
	d.file.IncRef()
	return d, nil
}

// Close removes fd and drops its reference (close_fd). A bad fd is EBADF.
func (t *FDTable) Close(fd int32) error {
	t.mu.Lock()
	if fd < 0 || int(fd) >= len(t.fds) || t.fds[fd].file == nil {
		t.mu.Unlock()
		return unix.EBADF
	}
	d := t.setLocked(int(fd), descriptor{})
	t.mu.Unlock()
	// The reference is dropped outside the lock: the last reference to an
	// outgoing LUO session unpreserves its files, which may take time.
	d.file.DecRef()
	return nil
}

// Dup installs a copy of fd at the lowest free fd at or above min, with
// FD_CLOEXEC set if cloexec (dup, F_DUPFD, F_DUPFD_CLOEXEC).
func (t *FDTable) Dup(fd int32, min int, cloexec bool) (int32, error) {
	d, err := t.get(fd)
	if err != nil {
		return -1, err
	}
	defer d.file.DecRef()
	return t.install(d.file, d.statusFlags, cloexec, min)
}

// Dup3 makes newfd a copy of oldfd, closing what newfd held, with
// FD_CLOEXEC set if flags has O_CLOEXEC (dup3(2), ksys_dup3). Errors are
// Linux's: EINVAL for flags other than O_CLOEXEC or for oldfd == newfd,
// EBADF for a bad oldfd or a newfd outside [0, MaxFDs).
func (t *FDTable) Dup3(oldfd, newfd int32, flags int) (int32, error) {
	if flags&^unix.O_CLOEXEC != 0 {
		return -1, unix.EINVAL
	}
	if oldfd == newfd {
		return -1, unix.EINVAL
	}
	if newfd < 0 || newfd >= MaxFDs {
		return -1, unix.EBADF
	}
	t.mu.Lock()
	if t.dropped || oldfd < 0 || int(oldfd) >= len(t.fds) || t.fds[oldfd].file == nil {
		t.mu.Unlock()
		return -1, unix.EBADF
	}
	d := t.fds[oldfd]
	d.file.IncRef()
	d.cloexec = flags&unix.O_CLOEXEC != 0
	old := t.setLocked(int(newfd), d)
	t.mu.Unlock()
	if old.file != nil {
		old.file.DecRef()
	}
	return newfd, nil
}

// CloseOnExec returns fd's FD_CLOEXEC (F_GETFD).
func (t *FDTable) CloseOnExec(fd int32) (bool, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if fd < 0 || int(fd) >= len(t.fds) || t.fds[fd].file == nil {
		return false, unix.EBADF
	}
	return t.fds[fd].cloexec, nil
}

// SetCloseOnExec sets fd's FD_CLOEXEC (F_SETFD).
func (t *FDTable) SetCloseOnExec(fd int32, cloexec bool) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if fd < 0 || int(fd) >= len(t.fds) || t.fds[fd].file == nil {
		return unix.EBADF
	}
	t.fds[fd].cloexec = cloexec
	return nil
}

// Len returns the number of open fds.
func (t *FDTable) Len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	n := 0
	for _, d := range t.fds {
		if d.file != nil {
			n++
		}
	}
	return n
}

// CloseAll closes every fd, highest first, as a process's exit does
// (close_files). Closing an outgoing LUO session's last fd unpreserves its
// files, exactly as in Linux.
func (t *FDTable) CloseAll() {
	t.mu.Lock()
	fds := t.fds
	t.fds, t.dropped = nil, true
	t.mu.Unlock()
	for i := len(fds) - 1; i >= 0; i-- {
		if fds[i].file != nil {
			fds[i].file.DecRef()
		}
	}
}

// drop empties the table without dropping any reference: the files stay
// alive for the memory teardown of a sentry that has handed its state over
// to the next one, and no release path (LUO session close) runs.
func (t *FDTable) drop() {
	t.mu.Lock()
	t.fds, t.dropped = nil, true
	t.mu.Unlock()
}

// Fork returns a copy of the table with a reference of its own on every
// file, each fd keeping its FD_CLOEXEC (dup_fd).
func (t *FDTable) Fork() *FDTable {
	t.mu.Lock()
	defer t.mu.Unlock()
	c := &FDTable{fds: append([]descriptor(nil), t.fds...)}
	for _, d := range c.fds {
		if d.file != nil {
			d.file.IncRef()
		}
	}
	return c
}

// CloseOnExecFDs closes every fd with FD_CLOEXEC, as a successful execve
// does (do_close_on_exec).
func (t *FDTable) CloseOnExecFDs() {
	t.mu.Lock()
	var closed []vfs.FileDescription
	for i := range t.fds {
		if d := &t.fds[i]; d.file != nil && d.cloexec {
			closed = append(closed, d.file)
			*d = descriptor{}
		}
	}
	t.mu.Unlock()
	for _, f := range closed {
		f.DecRef()
	}
}

// adopt takes over the fds of from, which must not be used again. The
// table must be empty.
func (t *FDTable) adopt(from *FDTable) {
	from.mu.Lock()
	fds := from.fds
	from.fds, from.dropped = nil, true
	from.mu.Unlock()
	t.mu.Lock()
	t.fds = fds
	t.mu.Unlock()
}
