package audit

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
)

// Following a stream: a Cursor reads a stream's records from its segment files in chain order,
// from any seq still on disk, on into segments begun after it was opened; the writer only tells
// readers that its durable head moved (Log.Durable: a channel it closes, never a send), so a reader,
// however slow, never holds up a record.

// Line is one record as written.
type Line struct {
	Seq uint64
	// MAC is the record's mac field (hex).
	MAC string
	// Raw is the record's line without its newline: the exact bytes the MAC covers, then the mac.
	Raw []byte
	// Segment is the file holding it.
	Segment string
}

// PrunedError is returned when the record asked for is no longer on disk: its segment was deleted.
type PrunedError struct{ Want, Oldest uint64 }

func (e *PrunedError) Error() string {
	return fmt.Sprintf("audit record %d is no longer on disk (its segment was deleted); the oldest record kept is %d", e.Want, e.Oldest)
}

// ErrNoStream is returned for a directory holding no segment.
var ErrNoStream = errors.New("no audit segment in the directory")

// Cursor reads a stream directory's records in order. It is not safe for concurrent use.
//
// Its reader reads ahead, past the writer's durable head, into bytes the writer may still cut back
// (a failed write or fsync truncates the file and reuses those seqs). So it keeps the byte offset of
// the next record, and bytes read ahead count only for records up to the durable head they were
// read under: beyond it, the cursor seeks back to that offset and reads the file again.
type Cursor struct {
	dir  string
	next uint64 // the seq of the next record to return
	seg  string
	f    *os.File
	br   *bufio.Reader
	off  int64  // the offset in seg of record next
	sure uint64 // what br holds is as written for records up to this seq (durable when read)
}

// OpenCursor opens a cursor on dir whose first record is from (0: the oldest record on disk). A from
// older than the oldest record kept is a *PrunedError; a from beyond the newest record is accepted
// only up to the newest record on disk plus one (Next returns that one once it is written).
func OpenCursor(dir string, from uint64) (*Cursor, error) {
	for try := 0; ; try++ {
		c, err := openCursor(dir, from)
		if errors.Is(err, os.ErrNotExist) && try < 3 {
			continue // its segment was pruned after the listing: list again (from is then older than the oldest)
		}
		return c, err
	}
}

func openCursor(dir string, from uint64) (*Cursor, error) {
	names, err := listSegments(dir)
	if err != nil {
		return nil, err
	}
	if len(names) == 0 {
		return nil, ErrNoStream
	}
	if testHookListed != nil {
		testHookListed()
	}
	oldest := firstSeq(names[0])
	if from == 0 {
		from = oldest
	}
	if from < oldest {
		return nil, &PrunedError{Want: from, Oldest: oldest}
	}
	c := &Cursor{dir: dir, next: from}
	i := len(names) - 1
	for i > 0 && firstSeq(names[i]) > from {
		i--
	}
	if err := c.open(names[i]); err != nil {
		return nil, err
	}
	// Each line of a segment is one record, in order: skip to from.
	for skip := from - firstSeq(names[i]); skip > 0; skip-- {
		line, err := readLine(c.br)
		if err != nil {
			c.Close()
			if err == io.EOF {
				return nil, fmt.Errorf("audit record %d is beyond the newest record on disk", from)
			}
			return nil, err
		}
		c.off += int64(len(line))
	}
	// Record from may not be durable yet: nothing read ahead of it is trusted (sure is 0).
	return c, nil
}

// testHookListed, when set (tests), runs between listing the segments and opening one: where a
// prune can race OpenCursor.
var testHookListed func()

func firstSeq(name string) uint64 {
	n, _ := strconv.ParseUint(name[len(segPrefix):len(name)-len(segSuffix)], 10, 64)
	return n
}

func (c *Cursor) open(name string) error {
	f, err := os.Open(filepath.Join(c.dir, name))
	if err != nil {
		return err
	}
	if c.f != nil {
		c.f.Close()
	}
	c.seg, c.f, c.br, c.off = name, f, bufio.NewReaderSize(f, 64*1024), 0
	return nil
}

// rewind drops what was read ahead: the file is read again from record next.
func (c *Cursor) rewind() error {
	if _, err := c.f.Seek(c.off, io.SeekStart); err != nil {
		return err
	}
	c.br.Reset(c.f)
	return nil
}

// Pos is the seq of the record Next returns next.
func (c *Cursor) Pos() uint64 { return c.next }

// Next returns the next record if its seq is at most upTo (the writer's durable head: records after
// it may still be rolled back), and ok false when there is none yet. A record on disk that is not the
// one expected (a seq out of place, no mac) is an error: the reader does not verify MACs, the
// subscriber does.
func (c *Cursor) Next(upTo uint64) (line Line, ok bool, err error) {
	if c.next > upTo {
		return Line{}, false, nil
	}
	if c.next > c.sure {
		// Bytes read ahead for record next were read before it was durable: the writer may have
		// cut them back and written other records with the same seqs since.
		if err := c.rewind(); err != nil {
			return Line{}, false, err
		}
		c.sure = upTo
	}
	for {
		raw, err := readLine(c.br)
		switch {
		case err == nil:
			c.off += int64(len(raw))
			return c.parse(raw)
		case err != io.EOF:
			return Line{}, false, err
		case len(raw) > 0:
			// Records up to upTo are whole on disk before the writer says so.
			return Line{}, false, fmt.Errorf("%s: record %d is cut short on disk", c.seg, c.next)
		}
		// The end of this segment, and the record is durable: it begins the next one.
		if err := c.advance(); err != nil {
			return Line{}, false, err
		}
		c.sure = upTo // a fresh reader, reading under upTo
	}
}

// advance moves to the segment whose first record is c.next.
func (c *Cursor) advance() error {
	names, err := listSegments(c.dir)
	if err != nil {
		return err
	}
	for _, n := range names {
		if firstSeq(n) == c.next {
			err := c.open(n)
			if errors.Is(err, os.ErrNotExist) { // pruned since listed
				if names, lerr := listSegments(c.dir); lerr == nil && len(names) > 0 && firstSeq(names[0]) > c.next {
					return &PrunedError{Want: c.next, Oldest: firstSeq(names[0])}
				}
			}
			return err
		}
	}
	if len(names) > 0 && firstSeq(names[0]) > c.next {
		return &PrunedError{Want: c.next, Oldest: firstSeq(names[0])}
	}
	return fmt.Errorf("audit record %d: no segment begins with it after %s (a segment is missing)", c.next, c.seg)
}

func (c *Cursor) parse(raw []byte) (Line, bool, error) {
	raw = bytes.TrimSuffix(raw, []byte("\n"))
	i := bytes.LastIndex(raw, []byte(macField))
	j := bytes.LastIndex(raw, []byte(`,"seq":`))
	if i < 0 || j < 0 || j > i || !bytes.HasSuffix(raw, []byte(`"}`)) {
		return Line{}, false, fmt.Errorf("%s: record %d is not an audit record", c.seg, c.next)
	}
	seq, err := strconv.ParseUint(string(raw[j+len(`,"seq":`):i]), 10, 64)
	if err != nil || seq != c.next {
		return Line{}, false, fmt.Errorf("%s: found %q where record %d belongs", c.seg, raw[j:i], c.next)
	}
	c.next++
	return Line{Seq: seq, MAC: string(raw[i+len(macField) : len(raw)-2]), Raw: bytes.Clone(raw), Segment: c.seg}, true, nil
}

// Close closes the file read.
func (c *Cursor) Close() error {
	if c.f == nil {
		return nil
	}
	err := c.f.Close()
	c.f = nil
	return err
}
