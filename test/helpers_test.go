package test

import (
	"encoding/binary"
	osexec "os/exec"
	"testing"

	abiguest "github.com/livesentry/livesentry/pkg/abi/guest"
)

func command(t *testing.T, name string, args ...string) *osexec.Cmd {
	t.Helper()
	return osexec.Command(name, args...)
}

func hello() []byte {
	b := make([]byte, abiguest.HelloSize)
	abiguest.Hello{Version: abiguest.Version}.Encode(b)
	return b
}

func header(op abiguest.Op, dataLen uint32) []byte {
	h := abiguest.RequestHeader{Op: op, DataLen: dataLen}
	b := make([]byte, abiguest.RequestHeaderSize)
	h.Encode(b)
	return b
}

func memfdCreate() []byte {
	b := header(abiguest.OpMemfdCreate, 2)
	binary.LittleEndian.PutUint64(b[8:], 0)
	return append(b, 'x', 0)
}
