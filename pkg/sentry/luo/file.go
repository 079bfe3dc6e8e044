package luo

import "fmt"

// luoFile is struct luo_file: one preserved file in a session.
//
// Its fields are guarded by the session's mu.
type luoFile struct {
	token   uint64
	handler *FileHandler
	// file is the preserved file (outgoing) or the retrieved one
	// (incoming, nil until retrieved). LUO holds a reference on it.
	file           File
	serializedData uint64
	privateData    any
	// frozen is set between a successful Freeze and Unfreeze.
	frozen bool
	// retrieveStatus is 0 before any retrieve, 1 after a successful one
	// and -errno after a failed one, whose error is retrieveErr.
	retrieveStatus int
	retrieveErr    error
}

func (lf *luoFile) args() FileOpArgs {
	return FileOpArgs{
		Handler:        lf.handler,
		RetrieveStatus: lf.retrieveStatus,
		File:           lf.file,
		SerializedData: lf.serializedData,
		PrivateData:    lf.privateData,
	}
}

func (lf *luoFile) compatible() string { return lf.handler.Compatible }

func (lf *luoFile) state() string {
	switch {
	case lf.retrieveStatus > 0:
		return "retrieved"
	case lf.retrieveStatus < 0:
		return fmt.Sprintf("retrieve failed: %v", lf.retrieveErr)
	case lf.file == nil:
		return "not retrieved"
	case lf.frozen:
		return "frozen"
	default:
		return "preserved"
	}
}

// freeze mirrors luo_file_freeze_one.
func (lf *luoFile) freeze() error {
	if lf.handler.Ops.Freeze != nil {
		args := lf.args()
		if err := lf.handler.Ops.Freeze(&args); err != nil {
			return err
		}
		lf.serializedData = args.SerializedData
	}
	lf.frozen = true
	return nil
}

// unfreeze mirrors luo_file_unfreeze_one.
func (lf *luoFile) unfreeze() {
	if lf.handler.Ops.Unfreeze != nil {
		args := lf.args()
		lf.handler.Ops.Unfreeze(&args)
	}
	lf.frozen = false
}
