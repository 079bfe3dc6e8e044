package memfd

// allowSealingAndAdd gives a file NewFromFolios just built the preserved seals,
// as memfd-v2's retrieve does with memfd_alloc_file("", MFD_ALLOW_SEALING)
// and memfd_add_seals: sealing is allowed, then seals are added with every
// rule of F_ADD_SEALS (F_SEAL_EXEC on the executable new file also adds the
// write and size seals). Nothing else can reach the file yet.
func (f *File) allowSealingAndAdd(seals uint32) error {
	f.mu.Lock()
	f.seals = 0
	f.mu.Unlock()
	return f.AddSeals(seals)
}
