package kho

import "github.com/livesentry/livesentry/pkg/pgalloc"

// MemoryFile returns the memory file k preserves memory of, so that users
// of KHO (LUO and its file handlers) can read and write the blocks they
// preserve and restore.
func (k *KHO) MemoryFile() *pgalloc.MemoryFile { return k.mf }
