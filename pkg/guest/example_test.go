package guest_test

import (
	"fmt"
	"net"
	"os"
	"path/filepath"

	"github.com/livesentry/livesentry/pkg/guest"
	"github.com/livesentry/livesentry/pkg/sentry/kernel"
	"golang.org/x/sys/unix"
)

// Example preserves a memfd in a LUO session, the way a guest prepares for
// a live restart. A real guest is launched by the sentry and calls
// guest.Dial("") to find its sandbox through LIVESENTRY_GUEST_SOCKET; here
// the example starts a sentry kernel itself.
func Example() {
	dir, _ := os.MkdirTemp("", "guest-example-")
	defer os.RemoveAll(dir)
	k, err := kernel.New(kernel.Options{MemorySize: 64 << 20})
	if err != nil {
		panic(err)
	}
	defer k.Shutdown()
	sock := filepath.Join(dir, "guest.sock")
	l, _ := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	defer l.Close()
	go k.Serve(l)

	g, err := guest.Dial(sock)
	if err != nil {
		panic(err)
	}
	defer g.Disconnect()
	fd, _ := g.MemfdCreate("state", unix.MFD_CLOEXEC)
	g.Write(fd, []byte("survives a restart"))
	st, _ := g.Fstat(fd)
	fmt.Println("memfd size:", st.Size)

	dev, _ := g.OpenLiveUpdate()
	sess, _ := g.CreateSession(dev, "my-app")
	if err := g.PreserveFD(sess, fd, 42); err != nil {
		panic(err)
	}
	// A preserved memfd's size is fixed until the restart, as in Linux.
	_, err = g.Pwrite(fd, []byte("more"), st.Size)
	fmt.Println("growing write:", err, unix.EPERM == err)
	// Errors are Linux errnos.
	_, err = g.OpenLiveUpdate()
	fmt.Println("second open of /dev/liveupdate:", err)
	// Output:
	// memfd size: 18
	// growing write: operation not permitted true
	// second open of /dev/liveupdate: device or resource busy
}
