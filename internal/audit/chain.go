package audit

import (
	"encoding/hex"
	"fmt"
)

// ChainVerifier checks records one at a time, as a subscriber of the stream receives them (keywardctl
// audit follow): the same checks as VerifyDir, record by record, with no file to read.
type ChainVerifier struct {
	w *walker
	// The last record whose MAC was checked here (a whole record), or the resume point: an elided
	// record moves the head, not this, until a whole record after it proves it.
	vseq uint64
	vmac []byte
}

// NewChainVerifier checks records under o.Key; o.Node and o.Stream, when set, must be the stream's.
func NewChainVerifier(o VerifyOptions) *ChainVerifier {
	o.Checkpoint, o.CheckpointKey = nil, nil
	return &ChainVerifier{w: newWalker(o, false)}
}

// Resume makes the record seq, whose MAC is mac (hex), the last one checked: the next record must
// chain from it. For a subscriber resuming from its own last record or from a checkpoint; the
// verifier's node and stream (VerifyOptions) are then the ones the stream's own records must name.
func (v *ChainVerifier) Resume(seq uint64, mac string) error {
	m, err := hex.DecodeString(mac)
	if err != nil || len(m) == 0 {
		return fmt.Errorf("resume point %d: malformed mac", seq)
	}
	w := v.w
	w.rep.head, w.seq, w.rep.LastSeq = m, seq, seq
	v.vseq, v.vmac = seq, m
	w.rep.Node, w.rep.Stream, w.rep.KeyID = w.o.Node, w.o.Stream, w.keyID
	if w.rep.FirstSeq == 0 {
		w.rep.FirstSeq = seq + 1
	}
	return nil
}

// Record checks the next record, its line as written (without the newline); firstOfSegment says it
// begins a segment file (then it must be an audit_segment record continuing the chain).
func (v *ChainVerifier) Record(raw []byte, firstOfSegment bool) error {
	w := v.w
	w.rep.File, w.rep.Line = "", 0
	if !w.record(raw, firstOfSegment) {
		return fmt.Errorf("%w: %s", ErrTampered, w.rep.Problem)
	}
	v.vseq, v.vmac = w.seq, w.rep.head
	return nil
}

// Elided takes a record known only by its seq and MAC (a subscription's filter left it out): it must
// be the next seq, and the next whole record's MAC, which chains from this one, proves it and every
// record before it. Until then it is not verified: Head moves, Verified does not.
func (v *ChainVerifier) Elided(seq uint64, mac string) error {
	w := v.w
	if w.rep.head == nil {
		return fmt.Errorf("%w: record %d is elided, but the chain has not begun (the first record must be whole)", ErrTampered, seq)
	}
	if seq != w.seq+1 {
		if seq > w.seq+1 {
			return fmt.Errorf("%w: records %d..%d are missing", ErrTampered, w.seq+1, seq-1)
		}
		return fmt.Errorf("%w: record %d is out of order or repeated (expected %d)", ErrTampered, seq, w.seq+1)
	}
	m, err := hex.DecodeString(mac)
	if err != nil || len(m) == 0 {
		return fmt.Errorf("%w: record %d: malformed mac", ErrTampered, seq)
	}
	w.seq, w.rep.head, w.rep.LastSeq = seq, m, seq
	w.rep.Records++
	return nil
}

// Head is the last record taken, whole or elided (seq 0: none), and its MAC (hex): where the chain
// continues from. An elided head is not verified yet (see Verified).
func (v *ChainVerifier) Head() (uint64, string) {
	return v.w.seq, hex.EncodeToString(v.w.rep.head)
}

// Verified is the last record whose MAC was checked (a whole record; or the resume point) and its
// MAC (hex); seq 0: none. Every record up to it is proven; elided records after it are not, until a
// whole record after them verifies. Only this may be reported as verified, or kept to resume from.
func (v *ChainVerifier) Verified() (uint64, string) {
	return v.vseq, hex.EncodeToString(v.vmac)
}

// Report is what the records checked say about the stream so far.
func (v *ChainVerifier) Report() Report { return v.w.rep }
