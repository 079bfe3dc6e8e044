package memfd

import "golang.org/x/sys/unix"

// AddSeals adds seals to the file, like fcntl(F_ADD_SEALS)
// (memfd_add_seals). Bits outside F_ALL_SEALS are EINVAL; any seal once
// F_SEAL_SEAL is set (as it is from the start on a file created without
// MFD_ALLOW_SEALING or MFD_NOEXEC_SEAL) is EPERM. F_SEAL_WRITE fails with
// EBUSY while LUO holds the folios pinned (PinFolios), as Linux's
// memfd_wait_for_pins gives up on pinned pages; there are no shared mappings
// to wait for. F_SEAL_EXEC on an executable file also adds F_SEAL_SHRINK,
// F_SEAL_GROW, F_SEAL_WRITE and F_SEAL_FUTURE_WRITE.
func (f *File) AddSeals(seals uint32) error {
	if seals&^allSeals != 0 {
		return unix.EINVAL
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.seals&unix.F_SEAL_SEAL != 0 {
		return unix.EPERM
	}
	if seals&unix.F_SEAL_WRITE != 0 && f.seals&unix.F_SEAL_WRITE == 0 && (f.pins.Load() > 0 || f.writableMaps.Load() > 0) {
		return unix.EBUSY
	}
	if seals&unix.F_SEAL_EXEC != 0 && f.mode&0111 != 0 {
		seals |= unix.F_SEAL_SHRINK | unix.F_SEAL_GROW | unix.F_SEAL_WRITE | unix.F_SEAL_FUTURE_WRITE
	}
	f.seals |= seals
	return nil
}

// GetSeals returns the file's seals, like fcntl(F_GET_SEALS). The error is
// always nil: every memfd can report its seals.
func (f *File) GetSeals() (uint32, error) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.seals, nil
}
