package audit

import (
	"bufio"
	"bytes"
	"crypto/ecdsa"
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
	"strings"
	"time"
)

// macField is always the last field of a record; the MAC covers every byte before it.
const macField = `,"mac":"`

// maxLine bounds a record's length when reading (records are far smaller: reasons are bounded).
const maxLine = 1 << 20

// VerifyOptions say what a stream must be to verify.
type VerifyOptions struct {
	Key []byte
	// Node and Stream, when set, must be the ones the stream's genesis binds.
	Node, Stream string
	// Checkpoint, when set, must be in the chain: a log ending before it was truncated, and one
	// whose record at its seq has another MAC was rewritten.
	Checkpoint *Checkpoint
	// CheckpointKey, when set, is the key checkpoints are signed with (keyward-kms's HSM key): the
	// Checkpoint must then carry a valid signature under it, or the stream does not verify.
	CheckpointKey *ecdsa.PublicKey
}

// Report is the result of a verification.
type Report struct {
	// Records is the number of records that verified, in order; FirstSeq and LastSeq the first and
	// last of them.
	Records           uint64
	FirstSeq, LastSeq uint64
	// Segments is the number of segment files read.
	Segments int
	// Node, Stream and KeyID are what the stream's records say it is.
	Node, Stream, KeyID string
	// File and Line locate the first problem (Line is 1-based; 0 if none).
	File string
	Line int
	// Problem describes the first broken, reordered, missing, swapped or truncated record ("" if
	// none).
	Problem string
	// Partial is the length of a partial record at the end of the last segment (a crash, or a write
	// in progress): not checked, and not counted.
	Partial int
	// Pruned is the number of records before FirstSeq that the stream's audit_pruned records
	// account for (deleted segments).
	Pruned uint64

	head []byte
	// For the writer: where the last whole record of the last file ends, and the partial tail after
	// it (torn is true when the file ends in one).
	goodSize int64
	torn     bool
}

// OK reports whether every record verified.
func (r Report) OK() bool { return r.Problem == "" }

// ErrTampered is returned by VerifyDir and VerifyFile when the stream does not verify.
var ErrTampered = errors.New("audit log does not verify")

// VerifyDir verifies a stream's directory: every segment in order, the chain across them, the
// genesis or the audit_pruned records that account for deleted segments, and the checkpoint.
func VerifyDir(dir string, o VerifyOptions) (Report, error) {
	names, err := listSegments(dir)
	if err != nil {
		return Report{}, err
	}
	paths := make([]string, len(names))
	for i, n := range names {
		paths[i] = filepath.Join(dir, n)
	}
	return verifyPaths(paths, o)
}

// VerifyPath verifies a stream directory, or a single segment file as if it were the whole stream
// (so a segment whose predecessors are missing fails).
func VerifyPath(path string, o VerifyOptions) (Report, error) {
	st, err := os.Stat(path)
	if err != nil {
		return Report{}, err
	}
	if st.IsDir() {
		return VerifyDir(path, o)
	}
	return verifyPaths([]string{path}, o)
}

func verifyPaths(paths []string, o VerifyOptions) (Report, error) {
	w := newWalker(o, false)
	if problem, err := checkCheckpoint(o); err != nil {
		return w.rep, err
	} else if problem != "" {
		w.fail("%s", problem)
		return w.rep, fmt.Errorf("%w: %s", ErrTampered, problem)
	}
	for i, p := range paths {
		f, err := os.Open(p)
		if err != nil {
			return w.rep, err
		}
		err = w.file(f, p)
		f.Close()
		if err != nil {
			return w.rep, err
		}
		if w.rep.torn && i < len(paths)-1 && w.rep.OK() {
			w.fail("partial record at the end of a segment that is not the newest")
		}
		if !w.rep.OK() {
			break
		}
	}
	w.finish()
	if !w.rep.OK() {
		return w.rep, fmt.Errorf("%w: %s", ErrTampered, w.rep.Problem)
	}
	return w.rep, nil
}

// walker checks records in chain order, across segment files.
type walker struct {
	o      VerifyOptions
	keyID  string
	rep    Report
	seq    uint64 // the last verified record
	start  *Chain // the segment header the walk started at, when not the genesis
	pruned map[uint64]string
	mac    hash.Hash // HMAC-SHA256 under the key, reused
	sum    [sha256.Size]byte
	// resume: the writer reads its newest segment alone, trusting its header, and tolerates a torn
	// tail (it cuts it back).
	resume bool
}

func newWalker(o VerifyOptions, resume bool) *walker {
	return &walker{o: o, keyID: KeyID(o.Key), pruned: map[uint64]string{}, resume: resume, mac: hmac.New(sha256.New, o.Key)}
}

// meta is what the walker reads of a record besides its MAC.
type meta struct {
	Seq   *uint64   `json:"seq"`
	Time  time.Time `json:"time"`
	Type  EventType `json:"event"`
	Chain *Chain    `json:"chain"`
}

func (w *walker) fail(format string, args ...any) {
	w.rep.Problem = fmt.Sprintf(format, args...)
	if w.rep.File != "" {
		w.rep.Problem = fmt.Sprintf("%s line %d: %s", filepath.Base(w.rep.File), w.rep.Line, w.rep.Problem)
	}
}

// file reads one segment. The error is for I/O failures; problems go to the report.
func (w *walker) file(r io.Reader, name string) error {
	w.rep.Segments++
	w.rep.File, w.rep.Line, w.rep.goodSize, w.rep.torn = name, 0, 0, false
	br := bufio.NewReaderSize(r, 64*1024)
	for {
		raw, err := readLine(br)
		if err != nil && err != io.EOF {
			return err
		}
		if len(raw) > 0 && err == io.EOF {
			// A last line without its newline: a write cut short by a crash.
			// Not a record (no MAC can be checked), so not a forgery either: reported, and cut back by
			// the writer when it next starts. In a segment that is not the last it is a break.
			w.rep.Line++
			w.rep.torn, w.rep.Partial = true, len(raw)
			return nil
		}
		if err == io.EOF {
			if w.rep.Line == 0 && !w.resume {
				w.fail("empty segment")
			}
			return nil
		}
		w.rep.Line++
		if w.resume && isZeros(raw) {
			// Blocks the file system extended but never wrote (power loss): a torn tail, if
			// nothing follows.
			rest, _ := io.ReadAll(br)
			if isZeros(rest) {
				w.rep.torn = true
				return nil
			}
		}
		if !w.record(raw[:len(raw)-1], w.rep.Line == 1) {
			return nil
		}
		w.rep.goodSize += int64(len(raw))
	}
}

// quickMeta reads a record's seq and event type without decoding it, as the writer lays records out
// (`{"time":...,"event":"...",` first, `,"seq":N` last); the stream's own records, which carry a
// chain, are decoded in full. ok is false when the layout is not the writer's (then the caller
// decodes). What it reads is covered by the MAC, checked next.
func quickMeta(body []byte) (m meta, ok bool) {
	i := bytes.LastIndex(body, []byte(`,"seq":`))
	if i < 0 {
		return m, false
	}
	seq, err := strconv.ParseUint(string(body[i+len(`,"seq":`):]), 10, 64)
	if err != nil {
		return m, false
	}
	const evKey = `"event":"`
	j := bytes.Index(body, []byte(evKey))
	if j < 0 || j > 64 {
		return m, false
	}
	k := bytes.IndexByte(body[j+len(evKey):], '"')
	if k < 0 {
		return m, false
	}
	m.Type = EventType(body[j+len(evKey) : j+len(evKey)+k])
	if strings.HasPrefix(string(m.Type), "audit_") || bytes.Contains(body, []byte(`"chain":`)) {
		return m, false
	}
	m.Seq = &seq
	return m, true
}

// readLine reads one line, newline included. The slice is valid until the next read.
func readLine(br *bufio.Reader) ([]byte, error) {
	var line []byte
	for {
		chunk, err := br.ReadSlice('\n')
		if line == nil && err != bufio.ErrBufferFull {
			return chunk, err // the usual case: the line fits in the buffer
		}
		line = append(line, chunk...)
		if err != bufio.ErrBufferFull {
			return line, err
		}
		if len(line) > maxLine {
			return line, fmt.Errorf("line longer than %d bytes", maxLine)
		}
	}
}

func isZeros(b []byte) bool {
	return len(bytes.Trim(b, "\x00\n")) == 0
}

// record checks one record; false stops the walk.
func (w *walker) record(raw []byte, firstOfFile bool) bool {
	i := bytes.LastIndex(raw, []byte(macField))
	if i < 0 || !bytes.HasSuffix(raw, []byte(`"}`)) {
		w.fail("not an audit record (no mac)")
		return false
	}
	body := raw[:i]
	got, err := hex.DecodeString(string(raw[i+len(macField) : len(raw)-2]))
	if err != nil {
		w.fail("malformed mac")
		return false
	}
	m, ok := quickMeta(body)
	if !ok {
		if err := json.Unmarshal(append(append(make([]byte, 0, len(body)+1), body...), '}'), &m); err != nil || m.Seq == nil {
			w.fail("malformed record")
			return false
		}
	}
	seq := *m.Seq
	if w.rep.head == nil {
		if !w.begin(seq, m) {
			return false
		}
	} else if firstOfFile {
		if m.Type != EventAuditSegment || m.Chain == nil || m.Chain.PrevSeq != w.seq || m.Chain.PrevMAC != hex.EncodeToString(w.rep.head) {
			w.fail("segment does not continue the chain from record %d (a segment is missing, or this one was swapped)", w.seq)
			return false
		}
	}
	switch want := w.seq + 1; {
	case seq > want:
		w.fail("records %d..%d are missing", want, seq-1)
		return false
	case seq < want:
		w.fail("record %d is out of order or repeated (expected %d)", seq, want)
		return false
	}
	w.mac.Reset()
	w.mac.Write(w.rep.head)
	w.mac.Write(body)
	if !hmac.Equal(got, w.mac.Sum(w.sum[:0])) {
		w.fail("record %d was modified, or written under another key, node or stream (mac does not match the chain)", seq)
		return false
	}
	if !w.own(seq, m, firstOfFile) {
		return false
	}
	if cp := w.o.Checkpoint; cp != nil && cp.Seq == seq && cp.MAC != hex.EncodeToString(got) {
		w.fail("record %d differs from the checkpoint taken at %s (the log was rewritten)", seq, cp.Time.Format("2006-01-02T15:04:05Z"))
		return false
	}
	w.seq, w.rep.head = seq, got
	w.rep.LastSeq = seq
	w.rep.Records++
	return true
}

// begin starts the chain at a stream's genesis or, when older segments were deleted, at a segment
// header (accounted for by an audit_pruned record later on; see finish).
func (w *walker) begin(seq uint64, m meta) bool {
	c := m.Chain
	switch {
	case m.Type == EventAuditGenesis && seq == 1 && c != nil:
		w.rep.head = genesisMAC(w.o.Key, c.Node, c.Stream)
	case m.Type == EventAuditSegment && c != nil && c.PrevSeq == seq-1:
		prev, err := hex.DecodeString(c.PrevMAC)
		if err != nil || len(prev) == 0 {
			w.fail("malformed segment header")
			return false
		}
		w.rep.head, w.start = prev, c
	default:
		w.fail("the log starts mid-chain at record %d (%s): it is not the stream's genesis nor a segment's first record", seq, m.Type)
		return false
	}
	switch {
	case w.o.Node != "" && c.Node != w.o.Node:
		w.fail("this is node %q's audit stream, not node %q's", c.Node, w.o.Node)
		return false
	case w.o.Stream != "" && c.Stream != w.o.Stream:
		w.fail("this is the %q audit stream, not %q", c.Stream, w.o.Stream)
		return false
	case c.KeyID != w.keyID:
		w.fail("the stream is keyed with key %s, not the given key %s", c.KeyID, w.keyID)
		return false
	}
	w.rep.Node, w.rep.Stream, w.rep.KeyID = c.Node, c.Stream, c.KeyID
	w.rep.FirstSeq, w.seq = seq, seq-1
	return true
}

// own checks the stream's own records: they must name this stream, and a segment header only
// starts a file.
func (w *walker) own(seq uint64, m meta, firstOfFile bool) bool {
	if m.Chain == nil {
		return true
	}
	c := m.Chain
	switch {
	case c.Node != w.rep.Node || c.Stream != w.rep.Stream || c.KeyID != w.rep.KeyID:
		w.fail("record %d names node %q stream %q key %s, in node %q's %q stream (key %s)", seq, c.Node, c.Stream, c.KeyID, w.rep.Node, w.rep.Stream, w.rep.KeyID)
		return false
	case m.Type == EventAuditGenesis && seq != 1, m.Type == EventAuditSegment && !firstOfFile:
		w.fail("record %d: %s in the middle of the stream", seq, m.Type)
		return false
	case m.Type == EventAuditPruned:
		w.pruned[c.PrevSeq] = c.PrevMAC
	}
	return true
}

// finish checks what can only be checked at the end: the stream is not empty, deleted segments are
// accounted for, and the checkpoint was reached.
func (w *walker) finish() {
	if !w.rep.OK() {
		return
	}
	w.rep.File, w.rep.Line = "", 0
	if w.rep.head == nil {
		w.fail("no records: an audit stream begins with its genesis record")
		return
	}
	if s := w.start; s != nil && !w.resume {
		if mac, ok := w.pruned[s.PrevSeq]; !ok || mac != s.PrevMAC {
			w.fail("the log starts at record %d, but records 1..%d are missing and no audit_pruned record accounts for them", s.PrevSeq+1, s.PrevSeq)
			return
		}
		w.rep.Pruned = s.PrevSeq
	}
	if cp := w.o.Checkpoint; cp != nil {
		switch {
		case cp.Node != w.rep.Node || cp.Stream != w.rep.Stream:
			w.fail("the checkpoint is node %q's %q stream, not this one (node %q, %q)", cp.Node, cp.Stream, w.rep.Node, w.rep.Stream)
		case cp.Seq > w.seq:
			w.fail("the log ends at record %d, but a checkpoint taken at %s shows record %d: its tail was truncated or it is an older copy",
				w.seq, cp.Time.Format("2006-01-02T15:04:05Z"), cp.Seq)
		case cp.Seq < w.rep.FirstSeq:
			w.fail("the checkpoint (record %d) predates the oldest record kept (%d)", cp.Seq, w.rep.FirstSeq)
		}
	}
}

// Filter selects records; zero fields match everything.
type Filter struct {
	Decision, Namespace, Event string
	Since                      time.Time
}

// Query reads records from r and returns those matching f, in file order. It does not verify the
// chain (run Verify for that); a partial last line (a crash) is skipped.
func Query(r io.Reader, f Filter) ([]Record, error) {
	var out []Record
	br := bufio.NewReaderSize(r, 64*1024)
	for line := 1; ; line++ {
		raw, err := readLine(br)
		if err == io.EOF { // the end, or a partial last line
			return out, nil
		}
		if err != nil {
			return nil, err
		}
		var rec Record
		if err := json.Unmarshal(raw, &rec); err != nil {
			return nil, fmt.Errorf("line %d: %w", line, err)
		}
		if f.matches(rec) {
			out = append(out, rec)
		}
	}
}

func (f Filter) matches(rec Record) bool {
	return (f.Decision == "" || string(rec.Decision) == f.Decision) && (f.Namespace == "" || rec.Subject.Namespace == f.Namespace) &&
		(f.Event == "" || string(rec.Type) == f.Event) && (f.Since.IsZero() || !rec.Time.Before(f.Since))
}

// QueryPath queries a stream directory (every segment, oldest first) or one file.
func QueryPath(path string, f Filter) ([]Record, error) {
	paths := []string{path}
	if st, err := os.Stat(path); err != nil {
		return nil, err
	} else if st.IsDir() {
		names, err := listSegments(path)
		if err != nil {
			return nil, err
		}
		paths = paths[:0]
		for _, n := range names {
			paths = append(paths, filepath.Join(path, n))
		}
	}
	var out []Record
	for _, p := range paths {
		fh, err := os.Open(p)
		if err != nil {
			return nil, err
		}
		recs, err := Query(fh, f)
		fh.Close()
		if err != nil {
			return nil, fmt.Errorf("%s: %w", filepath.Base(p), err)
		}
		out = append(out, recs...)
	}
	return out, nil
}
