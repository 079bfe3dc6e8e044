package handover

import (
	"encoding/json"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// EnvDescriptor is the environment variable that carries the descriptor
// across execve in exec mode.
const EnvDescriptor = "LIVESENTRY_HANDOVER"

// Inherit clears FD_CLOEXEC on f so that it survives execve, and returns its
// number, for Descriptor.Files in exec mode.
func Inherit(f *os.File) (int, error) {
	// Not f.Fd(), which would make the open file description, shared by
	// a listener serving on a dup of it, blocking.
	rc, err := f.SyscallConn()
	if err != nil {
		return -1, err
	}
	fd := -1
	var ferr error
	if err := rc.Control(func(u uintptr) {
		fd = int(u)
		_, ferr = unix.FcntlInt(u, unix.F_SETFD, 0)
	}); err != nil {
		return -1, err
	}
	if ferr != nil {
		return -1, fmt.Errorf("clearing FD_CLOEXEC on fd %d: %w", fd, ferr)
	}
	return fd, nil
}

// EncodeEnv returns d as an environment entry for execve.
func EncodeEnv(d *Descriptor) (string, error) {
	b, err := json.Marshal(d)
	if err != nil {
		return "", fmt.Errorf("encoding the handover descriptor: %w", err)
	}
	return EnvDescriptor + "=" + string(b), nil
}

// DecodeEnv parses the descriptor the previous image left in the
// environment, if any (ok false if there is none), and takes the inherited
// files it names, marking them close-on-exec again. The variable is removed
// from the environment so that guests never see it.
func DecodeEnv(known func(string) bool) (d *Descriptor, files []*os.File, ok bool, err error) {
	v, ok := os.LookupEnv(EnvDescriptor)
	if !ok {
		return nil, nil, false, nil
	}
	os.Unsetenv(EnvDescriptor)
	if len(v) > maxMessage {
		return nil, nil, true, fmt.Errorf("handover descriptor in %s: %d bytes exceed %d", EnvDescriptor, len(v), maxMessage)
	}
	d = new(Descriptor)
	if err := json.Unmarshal([]byte(v), d); err != nil {
		return nil, nil, true, fmt.Errorf("decoding the handover descriptor in %s: %w", EnvDescriptor, err)
	}
	if err := d.Validate(0, known); err != nil {
		return d, nil, true, err
	}
	for _, fd := range []int{d.Files.MemoryFile, d.Files.GuestListener, d.Files.ControlListener} {
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != nil {
			for _, f := range files {
				f.Close()
			}
			return d, nil, true, fmt.Errorf("handover descriptor: inherited fd %d: %w", fd, err)
		}
		unix.CloseOnExec(fd)
		files = append(files, os.NewFile(uintptr(fd), fmt.Sprintf("inherited-%d", fd)))
	}
	return d, files, true, nil
}
