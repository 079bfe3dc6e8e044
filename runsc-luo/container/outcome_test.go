package container

import (
	"errors"
	"testing"

	"github.com/livesentry/livesentry/runsc-luo/sandbox"
)

// A restart whose answer was lost is judged handed over by the new
// sentry's restart record alone, even once the sandbox has stopped (its
// relaunched entrypoint finished at once); a record that is no newer, that
// failed, or that a recovery since makes moot, is not taken for one.
func TestARestartRecordInTheStateIsTheHandoff(t *testing.T) {
	before := &sandbox.State{Status: sandbox.StatusRunning, LiveupdateNumber: 3, Recoveries: 1,
		LastRestart: &sandbox.RestartRecord{Generation: 3}}
	rec := func(gen uint64, errStr string) *sandbox.RestartRecord {
		return &sandbox.RestartRecord{Generation: gen, Error: errStr}
	}
	for _, c := range []struct {
		name string
		st   *sandbox.State
		err  error
		want bool
	}{
		{"stopped after the handoff", &sandbox.State{Status: sandbox.StatusStopped, LiveupdateNumber: 4, Recoveries: 1, LastRestart: rec(4, "")}, nil, true},
		{"running after the handoff", &sandbox.State{Status: sandbox.StatusRunning, LiveupdateNumber: 4, Recoveries: 1, LastRestart: rec(4, "")}, nil, true},
		{"the record of the restart before", &sandbox.State{Status: sandbox.StatusStopped, LiveupdateNumber: 3, Recoveries: 1, LastRestart: rec(3, "")}, nil, false},
		{"no record", &sandbox.State{Status: sandbox.StatusStopped, Recoveries: 1}, nil, false},
		{"a failed restart", &sandbox.State{Status: sandbox.StatusStopped, LiveupdateNumber: 4, Recoveries: 1, LastRestart: rec(4, "the new image refused")}, nil, false},
		{"recovered since", &sandbox.State{Status: sandbox.StatusRunning, LiveupdateNumber: 4, Recoveries: 2, LastRestart: rec(4, "")}, nil, false},
		{"an unreadable state", nil, errors.New("no state"), false},
	} {
		if got := handedOverIn(c.st, c.err, before) != nil; got != c.want {
			t.Errorf("%s: handed over %t, want %t", c.name, got, c.want)
		}
	}
}
