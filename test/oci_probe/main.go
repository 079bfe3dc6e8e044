// Command oci_probe is the process of the OCI end-to-end tests: it prints,
// as one JSON line, what the container gave it (arguments, environment,
// working directory, credentials, rlimits, hostname, pid, the guest
// socket), then holds (--hold) or exits with --exit's status. With
// --trap-usr1 it holds until SIGUSR1, prints "got SIGUSR1" and exits 0.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Report is what the probe prints.
type Report struct {
	Args      []string `json:"args"`
	Env       []string `json:"env"`
	Cwd       string   `json:"cwd"`
	UID       int      `json:"uid"`
	GID       int      `json:"gid"`
	Groups    []int    `json:"groups"`
	NofileMax uint64   `json:"nofile_max"`
	CoreCur   uint64   `json:"core_cur"`
	CoreMax   uint64   `json:"core_max"`
	Hostname  string   `json:"hostname"`
	PID       int      `json:"pid"`
	// GuestSocket says whether $LIVESENTRY_GUEST_SOCKET is a socket.
	GuestSocket bool `json:"guest_socket"`
	// RootEntries are the names in /.
	RootEntries []string `json:"root_entries"`
}

func main() {
	// The trap is set before the report is printed: the test signals as
	// soon as it reads the report, and pid 1 of a pid namespace ignores
	// a signal it has no handler for.
	usr1 := make(chan os.Signal, 1)
	for _, a := range os.Args[1:] {
		if a == "--trap-usr1" {
			signal.Notify(usr1, unix.SIGUSR1)
		}
	}
	r := Report{Args: os.Args, Env: os.Environ(), UID: os.Getuid(), GID: os.Getgid(), PID: os.Getpid()}
	r.Cwd, _ = os.Getwd()
	r.Groups, _ = os.Getgroups()
	var lim unix.Rlimit
	unix.Getrlimit(unix.RLIMIT_NOFILE, &lim)
	// The Go runtime raises its soft NOFILE limit: only the hard one is
	// as the container set it.
	r.NofileMax = lim.Max
	unix.Getrlimit(unix.RLIMIT_CORE, &lim)
	r.CoreCur, r.CoreMax = lim.Cur, lim.Max
	r.Hostname, _ = os.Hostname()
	if fi, err := os.Stat(os.Getenv("LIVESENTRY_GUEST_SOCKET")); err == nil {
		r.GuestSocket = fi.Mode()&os.ModeSocket != 0
	}
	if ents, err := os.ReadDir("/"); err == nil {
		for _, e := range ents {
			r.RootEntries = append(r.RootEntries, e.Name())
		}
	}
	b, _ := json.Marshal(r)
	fmt.Println(string(b))
	code := 0
	for _, a := range os.Args[1:] {
		if a == "--trap-usr1" {
			<-usr1
			fmt.Println("got SIGUSR1")
			os.Exit(0)
		}
		if v, ok := strings.CutPrefix(a, "--exit="); ok {
			code, _ = strconv.Atoi(v)
		}
		if a == "--hold" {
			for {
				time.Sleep(time.Hour)
			}
		}
	}
	os.Exit(code)
}
