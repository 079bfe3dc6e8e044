// Package memfd provides memfds: the anonymous, shmem-backed files of Linux's
// memfd_create(2), with their page cache in the memory file.
//
// A File is one memfd: its inode (size, page cache, seals, the frozen flag of
// a file preserved by LUO) and its one open file description (position,
// status flags). Every fd a guest holds for the memfd, dup'ed or not, refers
// to the same *File; FD_CLOEXEC belongs to the fd table, not here.
//
// The page cache maps a file's page index to a folio of the memory file, in
// a B-tree keyed by the index of the folio's last page, so that one descent
// finds the folio holding any index and an ascent from there visits a range
// in order. Folios are order 0, or order 9 (2 MiB, like shmem's large
// folios) where a write or fallocate covers an aligned 2 MiB range with
// nothing cached in it yet. A folio carries shmem's two page-cache flags:
// uptodate (its contents are initialised) and dirty (modified since it was
// created). Folios allocated by fallocate are dirty but not uptodate, like
// shmem's: they read as zeros and count as a hole for SEEK_DATA until
// written.
//
// Everything a program can observe through read, write, pread, pwrite,
// lseek, ftruncate, fallocate, fstat and the seal fcntls follows Linux
// (v6.18, checked against the host kernel's own memfds by the differential
// test in this package), with page granularity even where a large folio is
// used: an operation that needs part of a large folio to differ from the rest
// splits it first. docs/memfd.md lists the few deliberate differences.
//
// Lock order: File.posMu (f_pos_lock) → File.mu (the inode lock, i_rwsem) →
// pgalloc.MemoryFile's lock.
package memfd

import (
	"strings"
	"sync"
	"sync/atomic"

	"github.com/google/btree"
	abiguest "github.com/livesentry/livesentry/pkg/abi/guest"
	"github.com/livesentry/livesentry/pkg/pgalloc"
	"github.com/livesentry/livesentry/pkg/sentry/vfs"
	"golang.org/x/sys/unix"
)

const (
	// NamePrefix is the prefix Linux gives every memfd's name.
	NamePrefix = "memfd:"
	// NameMax is the longest name memfd_create accepts, in bytes:
	// NAME_MAX (255) minus the prefix (MFD_NAME_MAX_LEN).
	NameMax = 255 - len(NamePrefix)

	// MaxFileSize is the largest size and offset of a memfd
	// (MAX_LFS_FILESIZE, shmem's s_maxbytes).
	MaxFileSize = 1<<63 - 1
	// MaxRWCount is the most bytes one read or write transfers
	// (MAX_RW_COUNT); larger requests are shortened to it.
	MaxRWCount = 0x7ffff000

	// allFlags is MFD_ALL_FLAGS.
	allFlags = unix.MFD_CLOEXEC | unix.MFD_ALLOW_SEALING | unix.MFD_HUGETLB | unix.MFD_NOEXEC_SEAL | unix.MFD_EXEC
	// allSeals is F_ALL_SEALS.
	allSeals = unix.F_SEAL_SEAL | unix.F_SEAL_SHRINK | unix.F_SEAL_GROW | unix.F_SEAL_WRITE | unix.F_SEAL_FUTURE_WRITE | unix.F_SEAL_EXEC

	pageShift = pgalloc.PageShift
	pageSize  = pgalloc.PageSize
	// hugeOrder is the order of the large folios the page cache uses.
	hugeOrder = pgalloc.HugeOrder
	hugePages = 1 << hugeOrder
	// maxIndex is the page index of the last byte a memfd can hold.
	maxIndex = MaxFileSize >> pageShift
	// blocksPerPage is the number of 512-byte st_blocks units in a page.
	blocksPerPage = pageSize / 512
)

// lastIno numbers memfd inodes.
var lastIno atomic.Uint64

// File is a memfd: its inode (size, page cache, seals, frozen flag) and its
// one open file description (position, status flags). dup'ed fds share one
// *File. It is safe for concurrent use.
type File struct {
	mf   *pgalloc.MemoryFile
	name string
	ino  uint64 // +checklocksignore: set at creation and never changed; Stat happens to be its only reader.
	mode uint32

	// hugetlb is set for a file created with MFD_HUGETLB, which behaves like
	// a hugetlbfs file with an empty huge page pool; hpageShift is log2 of
	// its huge page size.
	hugetlb    bool
	hpageShift uint

	refs atomic.Int64

	// posMu is f_pos_lock: it serialises the calls that use and advance the
	// position, as Linux does for regular files.
	posMu sync.Mutex
	// pos is f_pos. Written with posMu held, read atomically.
	pos atomic.Int64

	// pins counts PinFolios calls not yet undone by UnpinFolios.
	pins atomic.Int32

	// writableMaps counts the shared writable mappings of the file
	// (mapping_writably_mapped): F_SEAL_WRITE cannot be added while there
	// are any.
	writableMaps atomic.Int32

	// mu is the inode lock (i_rwsem). Reads take it shared; everything that
	// changes the size, the page cache or the seals takes it exclusively.
	mu sync.RWMutex

	// size is i_size. Written with mu held exclusively, read atomically
	// (i_size_read).
	size atomic.Int64

	// frozen is SHMEM_F_MAPPING_FROZEN. Written with mu held exclusively.
	frozen atomic.Bool

	// seals are the file seals (F_SEAL_*).
	//
	// +checklocks:mu
	seals uint32

	// cache is the page cache.
	//
	// +checklocks:mu
	cache *btree.BTreeG[run]

	// nrPages is the number of pages in cache (shmem's alloced).
	//
	// +checklocks:mu
	nrPages uint64

	// scratch is reused by operations that collect folios.
	//
	// +checklocks:mu
	scratch []seg
}

// Create creates a memfd, like memfd_create(2), and returns it holding one
// reference. flags is a combination of MFD_CLOEXEC, MFD_ALLOW_SEALING,
// MFD_HUGETLB (with a huge page size in bits 26-31), MFD_NOEXEC_SEAL and
// MFD_EXEC; only its low 32 bits count, as in the system call. name is cut
// at its first NUL, as strncpy_from_user does. Errors are those of Linux:
// EINVAL for an unknown flag, a size without MFD_HUGETLB, MFD_EXEC with
// MFD_NOEXEC_SEAL or a name longer than NameMax bytes, and ENODEV for a huge
// page size the platform lacks (only 2 MiB and 1 GiB exist, as on x86-64).
//
// Like Linux with vm.memfd_noexec = 0, a file created without MFD_EXEC or
// MFD_NOEXEC_SEAL is executable (mode 0777). MFD_NOEXEC_SEAL gives mode 0666
// and the seal F_SEAL_EXEC, and allows further sealing; otherwise the file
// starts with F_SEAL_SEAL unless MFD_ALLOW_SEALING is given. MFD_CLOEXEC is
// accepted and left to the caller's fd table.
func Create(mf *pgalloc.MemoryFile, name string, flags uint) (*File, error) {
	fl := uint32(flags) // memfd_create's flags are an unsigned int.
	// sanitize_flags.
	if fl&unix.MFD_HUGETLB == 0 {
		if fl&^allFlags != 0 {
			return nil, unix.EINVAL
		}
	} else if fl&^(allFlags|unix.MFD_HUGE_MASK<<unix.MFD_HUGE_SHIFT) != 0 {
		return nil, unix.EINVAL
	}
	if fl&unix.MFD_EXEC != 0 && fl&unix.MFD_NOEXEC_SEAL != 0 {
		return nil, unix.EINVAL
	}
	// check_sysctl_memfd_noexec with vm.memfd_noexec = 0.
	if fl&(unix.MFD_EXEC|unix.MFD_NOEXEC_SEAL) == 0 {
		fl |= unix.MFD_EXEC
	}
	// alloc_name.
	if i := strings.IndexByte(name, 0); i >= 0 {
		name = name[:i]
	}
	if len(name) > NameMax {
		return nil, unix.EINVAL
	}
	var hpageShift uint
	if fl&unix.MFD_HUGETLB != 0 {
		// hugetlb_file_setup: a huge page size the host has no hstate
		// for is ENODEV.
		switch log := uint(fl >> unix.MFD_HUGE_SHIFT & unix.MFD_HUGE_MASK); {
		case log == 0:
			hpageShift = defaultHugePageShift()
		case hugePageShifts()[log]:
			hpageShift = log
		default:
			return nil, unix.ENODEV
		}
	}
	// alloc_file.
	seals := uint32(unix.F_SEAL_SEAL)
	switch {
	case fl&unix.MFD_NOEXEC_SEAL != 0:
		seals = unix.F_SEAL_EXEC
	case fl&unix.MFD_ALLOW_SEALING != 0:
		seals = 0
	}
	f := newFile(mf, name, seals)
	if fl&unix.MFD_NOEXEC_SEAL != 0 {
		f.mode &^= 0111
	}
	if fl&unix.MFD_HUGETLB != 0 {
		f.hugetlb, f.hpageShift = true, hpageShift
	}
	return f, nil
}

// newFile returns a new, empty, executable memfd with the given seals
// (F_SEAL_SEAL for one created without MFD_ALLOW_SEALING) holding one
// reference.
func newFile(mf *pgalloc.MemoryFile, name string, seals uint32) *File {
	f := &File{
		mf:    mf,
		name:  name,
		ino:   lastIno.Add(1),
		mode:  unix.S_IFREG | 0777,
		seals: seals,
		cache: btree.NewG(btreeDegree, runLess),
	}
	f.refs.Store(1)
	return f
}

// IncRef takes a reference on f.
func (f *File) IncRef() {
	if f.refs.Add(1) <= 1 {
		panic("memfd: IncRef of a released file")
	}
}

// DecRef drops a reference on f. The last one frees every folio of the page
// cache; f must not be used afterwards.
func (f *File) DecRef() {
	switch r := f.refs.Add(-1); {
	case r > 0:
		return
	case r < 0:
		panic("memfd: DecRef of a released file")
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.clearLocked()
}

// Name returns the memfd's name with its prefix, "memfd:<name>", as
// /proc/PID/fd shows it.
func (f *File) Name() string { return NamePrefix + f.name }

// StatusFlags returns the file status flags (F_GETFL): O_RDWR|O_LARGEFILE,
// as for every memfd.
func (f *File) StatusFlags() int { return unix.O_RDWR | vfs.OLargefile }

// IsHugetlb reports whether f was created with MFD_HUGETLB. LUO does not
// preserve such files.
func (f *File) IsHugetlb() bool { return f.hugetlb }

// Stat returns what fstat(2) shows of f: its size; st_blocks, the memory
// the page cache holds in 512-byte units, including pages beyond the end of
// the file that fallocate(FALLOC_FL_KEEP_SIZE) allocated; st_blksize, the
// page size or the huge page size of an MFD_HUGETLB file; st_mode,
// S_IFREG|0777 or S_IFREG|0666 for a file created with MFD_NOEXEC_SEAL;
// st_nlink 0, as a memfd is unlinked; and st_ino, unique among memfds of
// this process.
func (f *File) Stat() abiguest.Stat {
	f.mu.RLock()
	defer f.mu.RUnlock()
	st := abiguest.Stat{
		Size:    f.size.Load(),
		Blocks:  int64(f.nrPages) * blocksPerPage,
		Blksize: pageSize,
		Mode:    f.mode,
		Ino:     f.ino,
	}
	if f.hugetlb {
		st.Blksize = 1 << f.hpageShift
	}
	return st
}

// Lock takes the inode lock (inode_lock) exclusively. LUO holds it across
// PinFolios and SetFrozen.
//
// +checklocksacquire:f.mu
func (f *File) Lock() { f.mu.Lock() }

// Unlock releases the inode lock.
//
// +checklocksrelease:f.mu
func (f *File) Unlock() { f.mu.Unlock() }

// SetFrozen sets or clears the frozen state of a file LUO preserves
// (shmem_freeze). While frozen, changing the size (ftruncate to another
// size), writing past the end of the file and every fallocate fail with
// EPERM; reads, writes inside the file and seeks work. Unlike a seal, the
// state can be cleared, and it is not visible through GetSeals.
//
// Preconditions:
//   - f.Lock is held.
//
// +checklocks:f.mu
func (f *File) SetFrozen(frozen bool) { f.frozen.Store(frozen) }

// Frozen reports whether f is frozen.
func (f *File) Frozen() bool { return f.frozen.Load() }

// Pos returns the file position (f_pos).
func (f *File) Pos() int64 { return f.pos.Load() }

// Size returns the file size (i_size).
func (f *File) Size() int64 { return f.size.Load() }
