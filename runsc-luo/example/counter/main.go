// Command counter is the example guest of docs/guests.md: a counter kept in
// a memfd that LUO preserves across every live restart of the sentry.
//
// Each launch runs the cycle a guest follows:
//
//  1. retrieve: after a restart (LIVESENTRY_LIVEUPDATE_NUMBER > 0), take
//     back the session "counter" and its memfd (token 1);
//  2. use: read the count from it;
//  3. finish: tell LUO the session's files are the guest's own again;
//  4. create: count one more, in a new memfd in a new session;
//  5. preserve: hand the memfd to LUO under token 1, and hold the session
//     until the restart stops this process.
//
// It prints one line a launch: "counter VERSION: generation G count N".
// It needs no libc shim (it speaks the guest protocol through pkg/guest),
// so it runs as a static binary in any root filesystem.
package main

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/livesentry/livesentry/pkg/guest"
	"golang.org/x/sys/unix"
)

// version labels the build, to show a live upgrade of the guest (set with
// -ldflags "-X main.version=2").
var version = "1"

const (
	sessionName = "counter"
	token       = 1
)

func main() {
	err := run()
	fmt.Fprintf(os.Stderr, "counter: %v\n", err)
	os.Exit(1)
}

// run runs one launch; it holds until the restart stops the process and
// returns only on failure.
func run() error {
	gen := guest.LiveupdateNumber()
	c, err := guest.Dial("")
	if err != nil {
		return err
	}
	dev, err := c.OpenLiveUpdate()
	if err != nil {
		return fmt.Errorf("open /dev/liveupdate: %w", err)
	}
	var count uint64
	if gen > 0 {
		if count, err = retrieve(c, dev); err != nil {
			return err
		}
	}
	count++
	fmt.Printf("counter %s: generation %d count %d\n", version, gen, count)
	if err := preserve(c, dev, count); err != nil {
		return err
	}
	// Hold the session fd until the restart stops this process: closing
	// it would unpreserve the memfd.
	for {
		time.Sleep(time.Hour)
	}
}

// retrieve takes back the previous launch's count and finishes its
// session. A missing session (the first launch after a crash that lost it,
// see docs/crash.md) counts from zero.
func retrieve(c *guest.Conn, dev int) (uint64, error) {
	sess, err := c.RetrieveSession(dev, sessionName)
	if errors.Is(err, unix.ENOENT) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("retrieving session %q: %w", sessionName, err)
	}
	fd, err := c.RetrieveFD(sess, token)
	if err != nil {
		return 0, fmt.Errorf("retrieving token %d: %w", token, err)
	}
	var b [8]byte
	if _, err := c.Pread(fd, b[:], 0); err != nil {
		return 0, fmt.Errorf("reading the count: %w", err)
	}
	if err := c.FinishSession(sess); err != nil {
		return 0, fmt.Errorf("finishing session %q: %w", sessionName, err)
	}
	c.Close(fd)
	c.Close(sess)
	return binary.LittleEndian.Uint64(b[:]), nil
}

// preserve writes count into a new memfd and preserves it in a new
// session.
func preserve(c *guest.Conn, dev int, count uint64) error {
	sess, err := c.CreateSession(dev, sessionName)
	if err != nil {
		return fmt.Errorf("creating session %q: %w", sessionName, err)
	}
	fd, err := c.MemfdCreate("counter", 0)
	if err != nil {
		return fmt.Errorf("memfd_create: %w", err)
	}
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], count)
	if _, err := c.Pwrite(fd, b[:], 0); err != nil {
		return fmt.Errorf("writing the count: %w", err)
	}
	if err := c.PreserveFD(sess, fd, token); err != nil {
		return fmt.Errorf("preserving the memfd: %w", err)
	}
	return c.Close(fd)
}
