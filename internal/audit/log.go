package audit

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/keyward/keyward/internal/fault"
)

// Defaults of Options.
const (
	DefaultMaxSegmentBytes    = 64 << 20
	DefaultMaxSegmentAge      = 24 * time.Hour
	DefaultMaxSegments        = 16
	DefaultCheckpointEvery    = 1000
	DefaultCheckpointInterval = time.Minute
	// DefaultCheckpointSignTimeout bounds the wait for a checkpoint's signature.
	DefaultCheckpointSignTimeout = 5 * time.Second
)

// Options configure a Log.
type Options struct {
	// Dir is the stream's directory of segments (created 0700).
	Dir string
	// KeyFile holds the HMAC key (at least MinKeyBytes bytes). Never logged.
	KeyFile string
	// Node and Stream name the stream ("kms" or "broker"); its genesis binds them.
	Node, Stream string
	// Copy, when set, receives a copy of every written record, for log shippers: best effort, the
	// file is the record, and a failing copy does not fail requests.
	Copy io.Writer
	// Checkpoints, when set, receives a checkpoint line (the durable chain head) every
	// CheckpointEvery records or CheckpointInterval, whichever comes first, checked once per
	// SyncInterval (at least once a second).
	Checkpoints        io.Writer
	CheckpointEvery    uint64
	CheckpointInterval time.Duration
	// SignCheckpoint, when set, signs each checkpoint: it returns an ASN.1 DER ECDSA signature over
	// SHA-256 of msg (Checkpoint.SignedMessage), within ctx's deadline (CheckpointSignTimeout). It
	// never holds up records: a checkpoint it fails to sign in time is written unsigned, saying why,
	// and counted (Log.CheckpointSignFailures). nil: checkpoints are unsigned.
	SignCheckpoint        func(ctx context.Context, msg []byte) (sig []byte, err error)
	CheckpointSignTimeout time.Duration
	// SyncInterval is how often written records are fsynced (0: after every write, before callers
	// return).
	SyncInterval time.Duration
	// A segment is closed and a new one begun at MaxSegmentBytes or MaxSegmentAge; beyond
	// MaxSegments, the oldest are deleted (an audit_pruned record says so first).
	MaxSegmentBytes int64
	MaxSegmentAge   time.Duration
	MaxSegments     int

	// wrap lets tests put a faulty file under the writer.
	wrap func(appender) appender
}

func (o *Options) defaults() error {
	if o.Dir == "" || o.KeyFile == "" || o.Node == "" || o.Stream == "" {
		return errors.New("audit: a directory, a key file, a node and a stream name are required")
	}
	if o.MaxSegmentBytes <= 0 {
		o.MaxSegmentBytes = DefaultMaxSegmentBytes
	}
	if o.MaxSegmentAge <= 0 {
		o.MaxSegmentAge = DefaultMaxSegmentAge
	}
	if o.MaxSegments <= 0 {
		o.MaxSegments = DefaultMaxSegments
	}
	if o.CheckpointEvery == 0 {
		o.CheckpointEvery = DefaultCheckpointEvery
	}
	if o.CheckpointInterval <= 0 {
		o.CheckpointInterval = DefaultCheckpointInterval
	}
	if o.CheckpointSignTimeout <= 0 {
		o.CheckpointSignTimeout = DefaultCheckpointSignTimeout
	}
	if o.wrap == nil {
		o.wrap = func(a appender) appender { return a }
	}
	return nil
}

// Log is an Auditor writing a hash-chained stream of JSON records, one line each, in Event's
// schema, never sampled, never leveled, into segments of a directory.
//
// Records are group-committed: each caller encodes and chains its record under the lock, and whoever
// finds no write in progress writes every queued record in one write(2) while the others wait for
// theirs. Every caller still returns only after its own record reached the kernel (or failed), so
// fail-closed holds; concurrent callers just share the syscall.
//
// Faults: a failed or short write is cut back to the last whole record and the chain head rolled
// back; a failed fsync makes every Record fail until a retry (with backoff) has rewritten and
// synced what was written since the last good fsync; a partial record left by a crash is cut back
// when the log is next opened, and an audit_recovered record says so. Health reports the state.
type Log struct {
	o     Options
	key   []byte
	keyID string
	start time.Time

	mu   sync.Mutex
	cond *sync.Cond // signalled when a write or a sync completes
	mac  hash.Hash  // HMAC-SHA256 with the key, reused under mu

	lock     *os.File  // flock on the directory
	segs     []segment // oldest first; the last is being written
	segStart time.Time
	out      appender

	// The chain head: sequence number and MAC of the newest record encoded.
	seq  uint64
	prev []byte

	cur        *batch // records encoded and not yet handed to a writer
	spare      []byte
	writing    bool
	syncing    bool
	writtenSeq uint64 // the newest record in the file, and its MAC: where a failed write rolls back to
	writtenMAC []byte
	size       int64 // file size after record writtenSeq

	// pend holds what was written since the last good fsync, from offset pendOff: a failed fsync
	// may have dropped those pages, so the retry writes them again.
	pend       []byte
	pendOff    int64
	durableSeq uint64
	durableMAC []byte

	syncErr, writeErr error
	failingSince      time.Time
	refused           int
	failures          uint64 // records refused since Open (refused counts only the current outage)
	outage            string // a recovered fault that no record states yet

	// broken is set when a partial record could not be cut back: the file no longer ends on a whole
	// record, and appending would only hide the break. Every later Record fails.
	broken error

	cpSeq  uint64
	cpTime time.Time
	cps    checkpointSigner

	// advanced is closed (and forgotten) when durableSeq moves on: readers following the stream
	// wait on it (Durable); the writer never waits for them.
	advanced chan struct{}

	kick          chan struct{} // asks the background loop to sync now (pend is large)
	stop, stopped chan struct{}
}

// maxPend bounds the bytes kept for a retry between fsyncs: past it the background loop syncs at once.
const maxPend = 1 << 20

// appender is what records are written through: a segment file.
type appender interface {
	WriteAt([]byte, int64) (int, error)
	Sync() error
	Truncate(size int64) error
	Close() error
}

// batch is a group of consecutive records written with one write(2).
type batch struct {
	buf     []byte
	last    uint64 // seq of its newest record
	lastMAC []byte
	done    bool
	err     error
}

var _ Auditor = (*Log)(nil)

// Open opens (or creates) a stream's directory and continues its chain from the newest segment's
// last record, so a restarted process extends one verifiable chain. It reads only the newest
// segment (bounded by MaxSegmentBytes) and the first line of the others. A partial last record
// (a crash) is cut back and recorded; a segment that does not verify, or that is another node's
// or stream's, is refused.
func Open(o Options) (*Log, error) {
	if err := o.defaults(); err != nil {
		return nil, err
	}
	key, err := ReadKey(o.KeyFile)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(o.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("audit log: %w", err)
	}
	lock, err := lockDir(o.Dir)
	if err != nil {
		return nil, err
	}
	l := &Log{o: o, key: key, keyID: KeyID(key), start: time.Now().UTC(), mac: hmac.New(sha256.New, key), lock: lock,
		cur: &batch{}, kick: make(chan struct{}, 1), stop: make(chan struct{}), stopped: make(chan struct{})}
	l.cond = sync.NewCond(&l.mu)
	recovered, err := l.resume()
	fresh := err == nil && l.out == nil
	if fresh {
		err = l.genesis()
	}
	if err != nil {
		if l.out != nil {
			l.out.Close()
		}
		lock.Close()
		return nil, err
	}
	go l.maintain()
	if !fresh {
		first := Event{Type: EventAuditStart, Reason: "process started", Chain: l.chain()}
		if recovered != nil {
			first = Event{Type: EventAuditRecovered, Reason: "process started; the newest segment ended in a partial record, cut back", Chain: recovered}
		}
		first.Outcome(nil)
		if err := l.Record(context.Background(), first); err != nil {
			l.Close()
			return nil, err
		}
	}
	return l, nil
}

// chain is the stream's identity as its own records state it.
func (l *Log) chain() *Chain {
	return &Chain{Node: l.o.Node, Stream: l.o.Stream, KeyID: l.keyID, ProcessStart: l.start, PID: os.Getpid()}
}

// resume takes over the newest segment: it verifies it from its first record, cuts back a partial
// tail, drops a segment left without a whole record, and reads the older segments' headers. It
// returns what an audit_recovered record must say, if anything was cut.
func (l *Log) resume() (*Chain, error) {
	names, err := listSegments(l.o.Dir)
	if err != nil {
		return nil, err
	}
	var dropped int64
	for len(names) > 0 {
		path := filepath.Join(l.o.Dir, names[len(names)-1])
		f, err := os.OpenFile(path, os.O_RDWR, 0)
		if err != nil {
			return nil, fmt.Errorf("audit log: %w", err)
		}
		w := newWalker(VerifyOptions{Key: l.key, Node: l.o.Node, Stream: l.o.Stream}, true)
		err = w.file(f, path)
		if err == nil && !w.rep.OK() {
			err = fmt.Errorf("audit segment %s does not verify (%s); a tampered stream is not appended to: move the directory aside before starting", path, w.rep.Problem)
		}
		var st os.FileInfo
		if err == nil {
			st, err = f.Stat()
		}
		if err == nil && st.Size() > w.rep.goodSize {
			dropped += st.Size() - w.rep.goodSize
			if err = f.Truncate(w.rep.goodSize); err == nil {
				err = f.Sync()
			}
		}
		if err != nil {
			f.Close()
			return nil, err
		}
		if w.rep.Records == 0 { // a segment begun by a crashed process: not even its header is whole
			f.Close()
			if err := os.Remove(path); err != nil {
				return nil, err
			}
			if err := syncDir(l.o.Dir); err != nil {
				return nil, err
			}
			names = names[:len(names)-1]
			continue
		}
		l.out = l.o.wrap(f)
		l.seq, l.prev, l.size = w.rep.LastSeq, w.rep.head, w.rep.goodSize
		l.writtenSeq, l.writtenMAC, l.durableSeq, l.durableMAC = l.seq, l.prev, l.seq, l.prev
		l.pendOff = l.size
		break
	}
	for _, n := range names {
		s, err := readHeader(filepath.Join(l.o.Dir, n))
		if err != nil {
			return nil, err
		}
		l.segs = append(l.segs, s)
	}
	if len(l.segs) > 0 {
		l.segStart = l.segs[len(l.segs)-1].created
	}
	if dropped == 0 || l.out == nil {
		return nil, nil
	}
	c := l.chain()
	c.DroppedBytes, c.LastGoodSeq = dropped, l.seq
	return c, nil
}

// genesis begins a new stream.
func (l *Log) genesis() error {
	l.prev = genesisMAC(l.key, l.o.Node, l.o.Stream)
	ev := Event{Type: EventAuditGenesis, Reason: "audit stream begins", Chain: l.chain()}
	ev.Outcome(nil)
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.newSegmentLocked(ev)
}

// Record writes one record. It returns an error wrapping fault.ErrUnavailable when the record
// could not be written; the caller must then refuse the request.
func (l *Log) Record(_ context.Context, ev Event) error {
	if ev.Time.IsZero() {
		ev.Time = time.Now()
	}
	ev.Time = ev.Time.UTC()
	// Encoding needs no lock; only the sequence number and the MAC depend on the chain.
	buf := encoders.Get().(*encoder)
	defer encoders.Put(buf)
	buf.b.Reset()
	if err := buf.enc.Encode(ev); err != nil {
		return fmt.Errorf("audit encode: %w", fault.ErrUnavailable)
	}
	body := bytes.TrimSuffix(buf.b.Bytes(), []byte("}\n"))
	l.mu.Lock()
	defer l.mu.Unlock()
	err := l.refusing()
	if err == nil && l.rotateDue(ev.Time) {
		err = l.rotateLocked(ev.Time)
	}
	if err != nil {
		l.refused++
		l.failures++
		return err
	}
	bt := l.cur
	var mac []byte
	bt.buf, mac = l.sealLocked(bt.buf, body)
	l.seq++
	l.prev = mac
	bt.last, bt.lastMAC = l.seq, mac

	for !bt.done {
		if l.writing {
			l.cond.Wait()
			continue
		}
		l.flushLocked()
	}
	if bt.err != nil {
		l.refused++
		l.failures++
		return fmt.Errorf("audit write: %v: %w", bt.err, fault.ErrUnavailable)
	}
	return nil
}

// refusing is the error every Record returns while the log cannot make records durable.
func (l *Log) refusing() error {
	switch {
	case l.broken != nil:
		return fmt.Errorf("audit log unusable until restarted and repaired: %v: %w", l.broken, fault.ErrUnavailable)
	case l.syncErr != nil:
		return fmt.Errorf("audit sync failing since %s: %v: %w", l.failingSince.Format(time.RFC3339), l.syncErr, fault.ErrUnavailable)
	}
	return nil
}

// sealLocked appends the record whose JSON, without its closing brace, is body to dst: body, its
// seq (the head's plus one) and its MAC chained from the head. It returns the MAC; the caller moves
// the head.
func (l *Log) sealLocked(dst, body []byte) ([]byte, []byte) {
	n := len(dst)
	dst = append(dst, body...)
	dst = append(dst, `,"seq":`...)
	dst = strconv.AppendUint(dst, l.seq+1, 10)
	l.mac.Reset()
	l.mac.Write(l.prev)
	l.mac.Write(dst[n:])
	mac := l.mac.Sum(nil)
	dst = append(dst, macField...)
	dst = hex.AppendEncode(dst, mac)
	return append(dst, "\"}\n"...), mac
}

func (l *Log) rotateDue(now time.Time) bool {
	return l.size+int64(len(l.cur.buf)) >= l.o.MaxSegmentBytes || now.Sub(l.segStart) >= l.o.MaxSegmentAge
}

// rotateLocked closes the current segment (after writing and syncing what is queued for it) and
// begins the next with an audit_segment record naming the current one's last record.
func (l *Log) rotateLocked(now time.Time) error {
	for l.writing || l.syncing || len(l.cur.buf) > 0 {
		if l.writing || l.syncing {
			l.cond.Wait()
			continue
		}
		l.flushLocked()
	}
	if err := l.refusing(); err != nil || !l.rotateDue(now) {
		return err // another caller rotated meanwhile, or the flush failed
	}
	if len(l.pend) > 0 {
		if err := l.out.Sync(); err != nil {
			l.failedLocked(&l.syncErr, err)
			return fmt.Errorf("audit sync: %v: %w", err, fault.ErrUnavailable)
		}
		l.syncedLocked(len(l.pend), l.writtenSeq, l.writtenMAC)
	}
	c := l.chain()
	c.PrevSeq, c.PrevMAC = l.seq, hex.EncodeToString(l.prev)
	ev := Event{Time: now, Type: EventAuditSegment, Reason: "segment begins", Chain: c}
	ev.Outcome(nil)
	if err := l.newSegmentLocked(ev); err != nil {
		l.failedLocked(&l.writeErr, err)
		return fmt.Errorf("audit rotate: %v: %w", err, fault.ErrUnavailable)
	}
	return nil
}

// newSegmentLocked creates the next segment with ev as its first record, written and synced, and
// makes it current.
func (l *Log) newSegmentLocked(ev Event) error {
	if ev.Time.IsZero() {
		ev.Time = time.Now()
	}
	ev.Time = ev.Time.UTC()
	js, err := json.Marshal(ev)
	if err != nil {
		return err
	}
	line, mac := l.sealLocked(nil, bytes.TrimSuffix(js, []byte("}")))
	s := segment{name: segmentName(l.seq + 1), first: l.seq + 1, created: ev.Time}
	if ev.Chain != nil {
		s.prevSeq, s.prevMAC = ev.Chain.PrevSeq, ev.Chain.PrevMAC
	}
	path := filepath.Join(l.o.Dir, s.name)
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_RDWR, 0o600)
	if err != nil {
		return err
	}
	out := l.o.wrap(f)
	if _, err = out.WriteAt(line, 0); err == nil {
		if err = out.Sync(); err == nil {
			err = syncDir(l.o.Dir)
		}
	}
	if err != nil {
		out.Close()
		os.Remove(path)
		return err
	}
	if l.out != nil {
		l.out.Close()
	}
	if l.o.Copy != nil {
		l.o.Copy.Write(line)
	}
	l.out, l.segs, l.segStart = out, append(l.segs, s), ev.Time
	l.seq++
	l.prev = mac
	l.writtenSeq, l.writtenMAC, l.durableSeq, l.durableMAC = l.seq, mac, l.seq, mac
	l.size, l.pend, l.pendOff = int64(len(line)), l.pend[:0], int64(len(line))
	l.advanceLocked()
	l.recoveredLocked()
	return nil
}

// flushLocked writes the current batch with one write, mu released during the syscall. On a failed
// or short write the file is cut back to its last whole record and the chain head rolled back, so the
// file stays verifiable; the batch's callers, and those of records already chained after it, get the
// error.
func (l *Log) flushLocked() {
	bt := l.cur
	l.cur = &batch{buf: l.spare[:0]}
	l.spare = nil
	l.writing = true
	out, off, syncNow := l.out, l.size, l.o.SyncInterval <= 0
	l.mu.Unlock()

	n, err := out.WriteAt(bt.buf, off)
	if err == nil && syncNow {
		err = out.Sync()
	}
	var broken error
	if err != nil && n > 0 {
		if terr := out.Truncate(off); terr != nil {
			err = fmt.Errorf("%v; cutting back the partial record also failed: %v", err, terr)
			broken = err
		}
	}
	if err == nil && l.o.Copy != nil {
		l.o.Copy.Write(bt.buf) // a copy for log shippers; the file is the record
	}

	l.mu.Lock()
	l.writing = false
	if broken != nil {
		l.broken = broken
	}
	if err != nil {
		if next := l.cur; len(next.buf) > 0 {
			next.done, next.err = true, err
			l.cur = &batch{}
		}
		l.seq, l.prev = l.writtenSeq, l.writtenMAC
		bt.err = err
		l.failedLocked(&l.writeErr, err)
	} else {
		l.writtenSeq, l.writtenMAC = bt.last, bt.lastMAC
		l.size += int64(len(bt.buf))
		if syncNow {
			l.durableSeq, l.durableMAC = bt.last, bt.lastMAC
			l.advanceLocked()
		} else {
			l.pend = append(l.pend, bt.buf...)
			if len(l.pend) > maxPend {
				select {
				case l.kick <- struct{}{}:
				default:
				}
			}
		}
		if l.writeErr != nil {
			l.writeErr = nil
			l.recoveredLocked()
		}
	}
	bt.done = true
	l.spare, bt.buf = bt.buf[:0], nil
	l.cond.Broadcast()
}

// failedLocked sets a fault (writeErr or syncErr) and when the log began failing.
func (l *Log) failedLocked(slot *error, err error) {
	if l.syncErr == nil && l.writeErr == nil {
		l.failingSince = time.Now().UTC()
		l.refused = 0
	}
	*slot = err
}

// recoveredLocked notes that a fault ended, for the next audit_recovered record.
func (l *Log) recoveredLocked() {
	if l.failingSince.IsZero() || l.syncErr != nil || l.writeErr != nil {
		return
	}
	l.outage = fmt.Sprintf("audit records could not be written or synced from %s to %s; %d records were refused (their requests failed)",
		l.failingSince.Format(time.RFC3339Nano), time.Now().UTC().Format(time.RFC3339Nano), l.refused)
	l.failingSince = time.Time{}
}

// syncedLocked drops n bytes of pend, made durable up to record seq.
func (l *Log) syncedLocked(n int, seq uint64, mac []byte) {
	l.pend = l.pend[:copy(l.pend, l.pend[n:])]
	l.pendOff += int64(n)
	l.durableSeq, l.durableMAC = seq, mac
	l.advanceLocked()
	if l.syncErr != nil {
		l.syncErr = nil
		l.recoveredLocked()
	}
}

// advanceLocked tells the readers waiting in Durable that the durable head moved.
func (l *Log) advanceLocked() {
	if l.advanced != nil {
		close(l.advanced)
		l.advanced = nil
	}
}

// Durable returns the seq of the newest durable record (fsynced: it can no longer be rolled back)
// and a channel closed when that moves on. Records up to it are whole in the segment files, where a
// Cursor reads them.
func (l *Log) Durable() (uint64, <-chan struct{}) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.advanced == nil {
		l.advanced = make(chan struct{})
	}
	return l.durableSeq, l.advanced
}

// Done is closed when the log is closed.
func (l *Log) Done() <-chan struct{} { return l.stop }

// Dir is the stream's directory; Node, Stream and KeyID name it (KeyID never reveals the key).
func (l *Log) Dir() string    { return l.o.Dir }
func (l *Log) Node() string   { return l.o.Node }
func (l *Log) Stream() string { return l.o.Stream }
func (l *Log) KeyID() string  { return l.keyID }

// Health is nil while records are being written and synced, else why not: then every Record fails
// (and the daemons report not ready). It clears by itself when the disk recovers.
func (l *Log) Health() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	switch {
	case l.broken != nil:
		return fmt.Errorf("audit log unusable until restarted and repaired: %v", l.broken)
	case l.syncErr != nil:
		return fmt.Errorf("audit records cannot be synced since %s: %v", l.failingSince.Format(time.RFC3339), l.syncErr)
	case l.writeErr != nil:
		return fmt.Errorf("audit records cannot be written since %s: %v", l.failingSince.Format(time.RFC3339), l.writeErr)
	}
	return nil
}

// WriteFailures counts the records that could not be written or synced since Open (their requests
// failed).
func (l *Log) WriteFailures() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.failures
}

// Close syncs and closes the stream.
func (l *Log) Close() error {
	select {
	case <-l.stop:
	default:
		close(l.stop)
	}
	<-l.stopped
	l.cps.pending.Wait() // a checkpoint being signed is written within CheckpointSignTimeout
	l.mu.Lock()
	defer l.mu.Unlock()
	for l.writing || l.syncing {
		l.cond.Wait()
	}
	err := l.out.Sync()
	if cerr := l.out.Close(); err == nil {
		err = cerr
	}
	l.lock.Close()
	return err
}

// encoder is a pooled JSON encoder of Events (HTML characters are written as they are).
type encoder struct {
	b   bytes.Buffer
	enc *json.Encoder
}

var encoders = sync.Pool{New: func() any {
	e := &encoder{}
	e.enc = json.NewEncoder(&e.b)
	e.enc.SetEscapeHTML(false)
	return e
}}
