//go:build race

package boot

// raceEnabled: built with the race detector, whose shadow memory faults in
// pages of its own for every new heap address.
const raceEnabled = true
