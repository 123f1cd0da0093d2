package pkcs11

import (
	"errors"
	"testing"

	"github.com/keyward/keyward/internal/fault"
)

// FuzzParseCiphertext: any input gives a parsed envelope or ErrInvalid, never a panic, and a parsed
// envelope always has a full IV and room for a tag.
func FuzzParseCiphertext(f *testing.F) {
	f.Add([]byte{})
	f.Add([]byte{1})
	f.Add(append([]byte{1}, make([]byte, 60)...))
	f.Add(append([]byte{2}, make([]byte, 60)...))
	f.Fuzz(func(t *testing.T, b []byte) {
		p, err := parseCiphertext(b)
		if err != nil {
			if !errors.Is(err, fault.ErrInvalid) {
				t.Fatalf("error not ErrInvalid: %v", err)
			}
			return
		}
		if len(p.iv) != ivLen || len(p.sealed) <= tagLen || p.version != formatV1 {
			t.Fatalf("accepted %d bytes: iv %d sealed %d", len(b), len(p.iv), len(p.sealed))
		}
	})
}
