package audit

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"hash"
	"io"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/keyward/keyward/internal/fault"
)

// macField is always the last field of a record; the MAC covers every byte before it.
const macField = `,"mac":"`

// MinKeyBytes is the shortest HMAC key accepted.
const MinKeyBytes = 32

// Options configure a Log.
type Options struct {
	// Path of the JSON-lines audit file (appended to; created 0600).
	Path string
	// KeyFile holds the HMAC key (at least MinKeyBytes bytes). Never logged.
	KeyFile string
	// Stdout also copies every written record to standard output, for log shippers. The copy is best
	// effort: the file is the record, and a failing stdout does not fail requests.
	Stdout bool
	// SyncInterval is how often the file is fsynced (0: after every write, before callers return).
	SyncInterval time.Duration
}

// Log is an Auditor writing hash-chained JSON records, one line each, in Event's schema: never
// sampled, never leveled.
//
// Records are group-committed: each caller encodes and chains its record under the lock, and whoever
// finds no write in progress writes every queued record in one write(2) while the others wait for
// theirs. Every caller still returns only after its own record reached the kernel (or failed), so
// fail-closed holds; concurrent callers just share the syscall.
type Log struct {
	mu     sync.Mutex
	cond   *sync.Cond // signalled when a write completes
	mac    hash.Hash  // HMAC-SHA256 with the key, reused under mu
	file   *os.File
	out    appender  // the file; tests substitute a faulty one
	stdout io.Writer // optional copy of every record (best effort; the file is the record)

	// The chain head: sequence number and MAC of the newest record encoded.
	seq  uint64
	prev []byte

	cur        *batch // records encoded and not yet handed to a writer
	spare      []byte
	writing    bool
	writtenSeq uint64 // the newest record in the file, and its MAC: where a failed write rolls back to
	writtenMAC []byte
	size       int64 // file size after record writtenSeq

	dirty   bool
	syncErr error
	// broken is set when a partial record could not be cut back: the file no longer ends on a whole
	// record, and appending would only hide the break. Every later Record fails.
	broken       error
	stop         chan struct{}
	stopped      chan struct{}
	syncEachTime bool
}

// appender is what records are written through: the audit file.
type appender interface {
	Write([]byte) (int, error)
	Sync() error
	Truncate(size int64) error
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

// ReadKey reads an HMAC key file.
func ReadKey(path string) ([]byte, error) {
	key, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("audit key: %w", err)
	}
	key = bytes.TrimSpace(key)
	if len(key) < MinKeyBytes {
		return nil, fmt.Errorf("audit key %s: %d bytes, need at least %d", path, len(key), MinKeyBytes)
	}
	return key, nil
}

// Open opens (or creates) the audit file and continues the hash chain from its last record, so a
// restarted process extends one verifiable chain.
func Open(opts Options) (*Log, error) {
	key, err := ReadKey(opts.KeyFile)
	if err != nil {
		return nil, err
	}
	f, err := os.OpenFile(opts.Path, os.O_CREATE|os.O_RDWR|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("audit log: %w", err)
	}
	l := &Log{file: f, mac: hmac.New(sha256.New, key), cur: &batch{}, stop: make(chan struct{}), stopped: make(chan struct{})}
	l.cond = sync.NewCond(&l.mu)
	l.out = f
	if err := l.resume(key); err != nil {
		f.Close()
		return nil, err
	}
	if opts.Stdout {
		l.stdout = os.Stdout
	}
	if opts.SyncInterval > 0 {
		go l.syncLoop(opts.SyncInterval)
	} else {
		l.syncEachTime = true
		close(l.stopped)
	}
	return l, nil
}

// resume reads the existing file and takes over its chain head. A file whose chain does not verify
// is refused: appending to it would hide the break.
func (l *Log) resume(key []byte) error {
	if _, err := l.file.Seek(0, io.SeekStart); err != nil {
		return err
	}
	rep, err := Verify(l.file, key)
	if err != nil {
		return fmt.Errorf("audit log %s: %w", l.file.Name(), err)
	}
	if !rep.OK() {
		return fmt.Errorf("audit log %s does not verify (%s); move it aside before starting", l.file.Name(), rep.Problem)
	}
	st, err := l.file.Stat()
	if err != nil {
		return err
	}
	l.seq, l.prev = rep.Records, rep.head
	l.writtenSeq, l.writtenMAC, l.size = rep.Records, rep.head, st.Size()
	return nil
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
	// Room for the seq field in the pooled buffer, so appending it below does not allocate.
	buf.b.Grow(len(`,"seq":`) + 20)
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.broken != nil {
		return fmt.Errorf("audit log unusable until restarted and repaired: %v: %w", l.broken, fault.ErrUnavailable)
	}
	if !l.syncEachTime && l.syncErr != nil {
		return fmt.Errorf("audit sync: %v: %w", l.syncErr, fault.ErrUnavailable)
	}
	body := bytes.TrimSuffix(buf.b.Bytes(), []byte("}\n"))
	body = append(body, `,"seq":`...)
	body = strconv.AppendUint(body, l.seq+1, 10)
	l.mac.Reset()
	l.mac.Write(l.prev)
	l.mac.Write(body)
	mac := l.mac.Sum(nil)
	bt := l.cur
	bt.buf = append(bt.buf, body...)
	bt.buf = append(bt.buf, macField...)
	bt.buf = hex.AppendEncode(bt.buf, mac)
	bt.buf = append(bt.buf, "\"}\n"...)
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
		return fmt.Errorf("audit write: %v: %w", bt.err, fault.ErrUnavailable)
	}
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
	l.mu.Unlock()

	n, err := l.out.Write(bt.buf)
	if err == nil && l.syncEachTime {
		err = l.out.Sync()
	}
	var broken error
	if err != nil && n > 0 {
		if terr := l.out.Truncate(l.size); terr != nil {
			err = fmt.Errorf("%v; cutting back the partial record also failed: %v", err, terr)
			broken = err
		}
	}
	if err == nil && l.stdout != nil {
		l.stdout.Write(bt.buf) // a copy for log shippers; the file is the record
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
	} else {
		l.writtenSeq, l.writtenMAC = bt.last, bt.lastMAC
		l.size += int64(len(bt.buf))
		l.dirty = true
	}
	bt.done = true
	l.spare, bt.buf = bt.buf[:0], nil
	l.cond.Broadcast()
}

func (l *Log) syncLoop(every time.Duration) {
	defer close(l.stopped)
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-l.stop:
			return
		case <-t.C:
			l.mu.Lock()
			dirty := l.dirty
			l.dirty = false
			l.mu.Unlock()
			if !dirty {
				continue
			}
			err := l.out.Sync() // outside the lock: a slow disk must not stall every request
			l.mu.Lock()
			l.syncErr = err
			l.mu.Unlock()
		}
	}
}

// Close flushes and closes the file.
func (l *Log) Close() error {
	select {
	case <-l.stop:
	default:
		close(l.stop)
	}
	<-l.stopped
	l.mu.Lock()
	defer l.mu.Unlock()
	for l.writing {
		l.cond.Wait()
	}
	err := l.file.Sync()
	if cerr := l.file.Close(); err == nil {
		err = cerr
	}
	return err
}

func chainMAC(key, prev, body []byte) []byte {
	m := hmac.New(sha256.New, key)
	m.Write(prev)
	m.Write(body)
	return m.Sum(nil)
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
