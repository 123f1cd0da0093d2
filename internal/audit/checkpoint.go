package audit

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/keyward/keyward/internal/fault"
)

// Checkpoint is a stream's chain head at one moment, written to a second sink (a log shipper,
// another machine) so that a truncated or replaced log is detected against it.
type Checkpoint struct {
	Node   string    `json:"node"`
	Stream string    `json:"stream"`
	KeyID  string    `json:"key_id"`
	Seq    uint64    `json:"seq"`
	MAC    string    `json:"mac"`
	Time   time.Time `json:"time"`
	// Sig is the base64 of an ASN.1 DER ECDSA signature over SHA-256 of SignedMessage, when the
	// writer has a signer (keyward-kms: a P-256 key inside the HSM).
	Sig string `json:"sig,omitempty"`
	// Unsigned says why a writer that has a signer wrote this checkpoint without a signature (the
	// signer failed, or had not returned in time). Not covered by any signature.
	Unsigned string `json:"unsigned,omitempty"`
}

// checkpointDomain begins every signed checkpoint message, so that no other message signed with the
// same key can pass for a checkpoint.
const checkpointDomain = "keyward-audit-checkpoint-v1\n"

// SignedMessage is what a checkpoint's signature covers: a fixed prefix, then the checkpoint's JSON
// without sig and unsigned. It is the one canonical encoding; writer and verifier both use it.
func (c Checkpoint) SignedMessage() []byte {
	c.Sig, c.Unsigned = "", ""
	c.Time = c.Time.UTC()
	js, err := json.Marshal(c)
	if err != nil { // strings, a number and a UTC time: cannot happen
		panic(err)
	}
	return append([]byte(checkpointDomain), js...)
}

// VerifySignature checks that c carries a valid signature under pub (ECDSA over SHA-256 of
// SignedMessage, ASN.1 DER).
func (c Checkpoint) VerifySignature(pub *ecdsa.PublicKey) error {
	at := fmt.Sprintf("the checkpoint of record %d (taken at %s)", c.Seq, c.Time.UTC().Format(time.RFC3339))
	if c.Sig == "" {
		if c.Unsigned != "" {
			return fmt.Errorf("%s is not signed (its writer could not sign it: %s)", at, c.Unsigned)
		}
		return fmt.Errorf("%s is not signed (a writer with a signing key says why it could not sign; this line says nothing: forged, or written without a key)", at)
	}
	sig, err := base64.StdEncoding.DecodeString(c.Sig)
	if err == nil {
		sum := sha256.Sum256(c.SignedMessage())
		if ecdsa.VerifyASN1(pub, sum[:], sig) {
			return nil
		}
	}
	return fmt.Errorf("%s does not carry a valid signature by the given key: it was edited, forged, or signed with another key", at)
}

// ReadCheckpointKey reads the public key checkpoints are signed with: a PEM "PUBLIC KEY" (PKIX) block
// holding an ECDSA P-256 key, as keywardctl kms checkpoint-key export writes it.
func ReadCheckpointKey(path string) (*ecdsa.PublicKey, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("checkpoint public key: %w", err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != "PUBLIC KEY" {
		return nil, fmt.Errorf("checkpoint public key %s: no PEM PUBLIC KEY block", path)
	}
	k, err := x509.ParsePKIXPublicKey(blk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("checkpoint public key %s: %w", path, err)
	}
	pub, ok := k.(*ecdsa.PublicKey)
	if !ok || pub.Curve != elliptic.P256() {
		return nil, fmt.Errorf("checkpoint public key %s: not an ECDSA P-256 key", path)
	}
	return pub, nil
}

// checkpointLine is how a checkpoint is written: one JSON line with a key no record has.
type checkpointLine struct {
	Checkpoint *Checkpoint `json:"keyward_audit_checkpoint"`
}

// ReadCheckpoint reads the newest checkpoint of node's stream from r: a sink's output, where
// checkpoint lines may be mixed with other lines (records, logs), which are skipped. A line may be
// the daemon's stdout as written, or as kubelet's CRI log file holds it (/var/log/pods/.../0.log:
// "TIME stdout F LINE"; stderr and partial lines are not checkpoints).
func ReadCheckpoint(r io.Reader, node, stream string) (*Checkpoint, error) {
	var best *Checkpoint
	br := bufio.NewReaderSize(r, 64*1024)
	for {
		raw, err := readLine(br)
		raw = criContent(raw)
		if bytes.Contains(raw, []byte(`"keyward_audit_checkpoint"`)) {
			var cl checkpointLine
			if json.Unmarshal(raw, &cl) == nil && cl.Checkpoint != nil && cl.Checkpoint.Node == node && cl.Checkpoint.Stream == stream &&
				(best == nil || cl.Checkpoint.Seq > best.Seq) {
				best = cl.Checkpoint
			}
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, err
		}
	}
	if best == nil {
		return nil, fmt.Errorf("no checkpoint of node %q's %q stream found", node, stream)
	}
	return best, nil
}

// criContent is the logged line of a CRI container log line ("TIME stdout F LINE"): the one format
// kubelet writes containers' output in. Any other line is returned as it is; a CRI line of stderr or
// a partial (P) line gives nil.
func criContent(line []byte) []byte {
	if len(line) == 0 || line[0] == '{' {
		return line
	}
	f := bytes.SplitN(line, []byte(" "), 4)
	if len(f) != 4 {
		return line
	}
	if _, err := time.Parse(time.RFC3339Nano, string(f[0])); err != nil {
		return line
	}
	if string(f[1]) != "stdout" || string(f[2]) != "F" {
		return nil
	}
	return f[3]
}

// checkCheckpoint is the verifier's check of the checkpoint itself, before the walk: with a
// CheckpointKey, the checkpoint must carry a valid signature under it.
func checkCheckpoint(o VerifyOptions) (problem string, err error) {
	if o.CheckpointKey == nil {
		return "", nil
	}
	if o.Checkpoint == nil {
		return "", errors.New("a checkpoint key was given without a checkpoint to check with it")
	}
	if err := o.Checkpoint.VerifySignature(o.CheckpointKey); err != nil {
		return err.Error(), nil
	}
	return "", nil
}

// checkpointSigner is the Log's state for signing checkpoints (Options.SignCheckpoint).
type checkpointSigner struct {
	busy     atomic.Bool    // a signature is being made (one at a time)
	writeMu  sync.Mutex     // orders writes to the checkpoint sink
	pending  sync.WaitGroup // checkpoints being signed and not yet written; Close waits (bounded)
	failures uint64         // under writeMu
}

// writeCheckpoint writes cp to the checkpoint sink, signed when Options.SignCheckpoint is set. The
// signature is made beside the background loop, which never waits for it, and is waited for at most
// CheckpointSignTimeout: a checkpoint whose signer fails, does not return in time, or is still busy
// with the previous checkpoint is written unsigned, saying why in its "unsigned" field, and counted
// (CheckpointSignFailures). Records are written and synced all the while: signing never holds them up.
func (l *Log) writeCheckpoint(cp Checkpoint) {
	cs := &l.cps
	if l.o.SignCheckpoint == nil {
		l.emitCheckpoint(cp, nil)
		return
	}
	if !cs.busy.CompareAndSwap(false, true) {
		l.emitCheckpoint(cp, errors.New("the signature of an earlier checkpoint has not returned"))
		return
	}
	timeout := l.o.CheckpointSignTimeout
	var once sync.Once
	finish := func(sig []byte, err error) {
		once.Do(func() {
			if err == nil {
				cp.Sig = base64.StdEncoding.EncodeToString(sig)
			}
			l.emitCheckpoint(cp, err)
			cs.pending.Done()
		})
	}
	cs.pending.Add(1)
	timer := time.AfterFunc(timeout, func() { finish(nil, fmt.Errorf("no signature within %s", timeout)) })
	msg := cp.SignedMessage()
	go func() {
		defer cs.busy.Store(false)
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		sig, err := l.o.SignCheckpoint(ctx, msg)
		if err == nil && len(sig) == 0 {
			err = errors.New("the signer returned no signature")
		}
		if err != nil {
			err = fmt.Errorf("signing failed: %w", err)
		}
		timer.Stop()
		finish(sig, err)
	}()
}

// emitCheckpoint writes one checkpoint line; signErr, when set, is why a checkpoint that should have
// been signed is not.
func (l *Log) emitCheckpoint(cp Checkpoint, signErr error) {
	cs := &l.cps
	cs.writeMu.Lock()
	defer cs.writeMu.Unlock()
	if signErr != nil {
		cs.failures++
		cp.Sig, cp.Unsigned = "", fault.Truncate(signErr.Error(), 240)
	}
	line, err := json.Marshal(checkpointLine{&cp})
	if err == nil {
		l.o.Checkpoints.Write(append(line, '\n'))
	}
}

// CheckpointSignFailures counts the checkpoints written unsigned although a signer is set (the
// signer failed, was too slow, or was still busy), since Open.
func (l *Log) CheckpointSignFailures() uint64 {
	l.cps.writeMu.Lock()
	defer l.cps.writeMu.Unlock()
	return l.cps.failures
}
