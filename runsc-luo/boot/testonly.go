package boot

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/livesentry/livesentry/pkg/sentry/handover"
	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/log"
)

// envCrashAt carries a CrashAt from the old sentry to the new one (transfer
// mode: the new process's environment; exec mode: execve's). The new
// sentry removes it from its environment before it launches anything.
const envCrashAt = "LIVESENTRY_TESTONLY_CRASH_AT"

// envCommitDelay carries RestartArgs.TestOnlyCommitDelay to the new
// sentry, which removes it from its environment and sleeps that long at
// handover.AcceptBooted.
const envCommitDelay = "LIVESENTRY_TESTONLY_COMMIT_DELAY"

// commitDelayFromEnv returns a fault hook that sleeps at AcceptBooted for
// the delay envCommitDelay names, then calls next; next if none.
func commitDelayFromEnv(next func(handover.Point) error) func(handover.Point) error {
	v, ok := os.LookupEnv(envCommitDelay)
	if !ok {
		return next
	}
	os.Unsetenv(envCommitDelay)
	d, err := time.ParseDuration(v)
	if err != nil || d <= 0 {
		log.Warningf("TESTONLY: %s=%q: not a positive duration (%v)", envCommitDelay, v, err)
		return next
	}
	return func(p handover.Point) error {
		if p == handover.AcceptBooted {
			log.Infof("TESTONLY: sleeping %v before the decision", d)
			time.Sleep(d)
		}
		if next == nil {
			return nil
		}
		return next(p)
	}
}

// envSpareCrashAt, in a spare sentry's environment (which it inherits from
// the supervisor, and the supervisor from "run"), names an accept point at
// which the spare SIGKILLs itself while it boots a recovery: a test of the
// supervisor's fallback to a started sentry. Only a spare reads it.
const envSpareCrashAt = "LIVESENTRY_TESTONLY_SPARE_CRASH_AT"

// spareCrashAtFromEnv returns the CrashAt envSpareCrashAt asks for, nil if
// none (or a point that is not an accept point, which is logged).
func spareCrashAtFromEnv() *CrashAt {
	v, ok := os.LookupEnv(envSpareCrashAt)
	if !ok {
		return nil
	}
	os.Unsetenv(envSpareCrashAt)
	c, err := ParseCrashAt(CrashNew + "@" + v)
	if err != nil || !strings.HasPrefix(v, "accept/") {
		log.Warningf("TESTONLY: %s=%q: not an accept point (%v)", envSpareCrashAt, v, err)
		return nil
	}
	return c
}

// Who can be SIGKILLed at a point by CrashAt.
const (
	CrashOld        = "old"        // the old sentry (exec mode: the old image)
	CrashNew        = "new"        // the new sentry (exec mode: the new image, the same pid)
	CrashGuest      = "guest"      // every guest process of the old sentry
	CrashSupervisor = "supervisor" // the sandbox's supervisor
)

// CrashAt is a fault for tests ("restart --TESTONLY-crash-at"): when a
// sentry of the restart reaches Point, it SIGKILLs Who, at once or Delay
// later (from another goroutine, so that the kill lands inside the step
// after Point: a Delay after handover.OfferPaused lands in LUO freeze or
// KHO finalize, one after handover.AcceptReceived in mapping, KHO ingest or
// LUO deserialize). Offer points are reached by the old sentry, accept
// points by the new one. The old sentry resolves the pids of every
// process that may be named before the restart starts.
type CrashAt struct {
	Who   string         `json:"who"`
	Point handover.Point `json:"point"`
	Delay time.Duration  `json:"delay,omitempty"`

	// Old, Guests and Supervisor are the pids of the old sentry, its
	// guests and the supervisor (0 if none).
	Old        int   `json:"old"`
	Guests     []int `json:"guests,omitempty"`
	Supervisor int   `json:"supervisor,omitempty"`

	// settle, if not nil, is called after the guests are killed: it
	// waits until their deaths have had their effects on this sentry
	// (Sentry.settleGuests), so that a kill at a point lands before the
	// next step.
	settle func(pids []int)

	mu sync.Mutex
	// last is the last point this side reached.
	//
	// +checklocks:mu
	last handover.Point
}

// ParseCrashAt parses "WHO@POINT" or "WHO@POINT+DELAY", e.g.
// "new@accept/booted" or "old@offer/paused+200us".
func ParseCrashAt(s string) (*CrashAt, error) {
	who, rest, ok := strings.Cut(s, "@")
	if !ok {
		return nil, fmt.Errorf("crash point %q: want WHO@POINT[+DELAY]", s)
	}
	c := &CrashAt{Who: who}
	point, delay, hasDelay := strings.Cut(rest, "+")
	c.Point = handover.Point(point)
	switch who {
	case CrashOld, CrashNew, CrashGuest, CrashSupervisor:
	default:
		return nil, fmt.Errorf("crash point %q: %q is none of %s, %s, %s, %s", s, who, CrashOld, CrashNew, CrashGuest, CrashSupervisor)
	}
	known := false
	for _, p := range handover.Points {
		known = known || p == c.Point
	}
	if !known {
		return nil, fmt.Errorf("crash point %q: no point %q (see handover.Points)", s, point)
	}
	if hasDelay {
		d, err := time.ParseDuration(delay)
		if err != nil || d < 0 {
			return nil, fmt.Errorf("crash point %q: delay %q: %v", s, delay, err)
		}
		c.Delay = d
	}
	return c, nil
}

// env returns c as an environment entry for the new sentry.
func (c *CrashAt) env() string {
	b, _ := json.Marshal(c)
	return envCrashAt + "=" + string(b)
}

// crashAtFromEnv returns the CrashAt the old sentry left in the
// environment, if any, and removes it.
func crashAtFromEnv() *CrashAt {
	v, ok := os.LookupEnv(envCrashAt)
	if !ok {
		return nil
	}
	os.Unsetenv(envCrashAt)
	c := new(CrashAt)
	if err := json.Unmarshal([]byte(v), c); err != nil {
		log.Warningf("TESTONLY: %s: %v", envCrashAt, err)
		return nil
	}
	return c
}

// fault returns a handover.Options.Fault for this side: newPID returns the
// new sentry's pid (this process on the incoming side and in exec mode).
// next, if not nil, is called first at every point.
func (c *CrashAt) fault(newPID func() int, next func(handover.Point) error) func(handover.Point) error {
	return func(p handover.Point) error {
		if next != nil {
			if err := next(p); err != nil {
				return err
			}
		}
		if c == nil {
			return nil
		}
		c.mu.Lock()
		c.last = p
		c.mu.Unlock()
		if p != c.Point {
			return nil
		}
		var pids []int
		switch c.Who {
		case CrashOld:
			pids = []int{c.Old}
		case CrashNew:
			pids = []int{newPID()}
		case CrashGuest:
			pids = c.Guests
		case CrashSupervisor:
			pids = []int{c.Supervisor}
		}
		if c.Delay == 0 {
			c.kill(pids)
			if c.Who == CrashGuest && c.settle != nil {
				c.settle(pids)
			}
			return nil
		}
		go func() {
			time.Sleep(c.Delay)
			c.kill(pids)
		}()
		return nil
	}
}

// kill SIGKILLs pids, this process last.
func (c *CrashAt) kill(pids []int) {
	c.mu.Lock()
	last := c.last
	c.mu.Unlock()
	log.Warningf("TESTONLY: SIGKILL of the %s (pids %v) at %s+%v, last point reached %s", c.Who, pids, c.Point, c.Delay, last)
	self := false
	for _, pid := range pids {
		if pid == os.Getpid() {
			self = true
		} else if pid > 1 {
			unix.Kill(pid, unix.SIGKILL)
		}
	}
	if self {
		unix.Kill(os.Getpid(), unix.SIGKILL)
		select {}
	}
}
