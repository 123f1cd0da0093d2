package audit

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// A stream is a directory of segments, audit-<first seq, 20 digits>.jsonl, so names sort in chain
// order. Each segment after the first begins with an audit_segment record naming the previous
// segment's last record.
const (
	segPrefix = "audit-"
	segSuffix = ".jsonl"
	lockName  = ".lock"
)

func segmentName(first uint64) string { return fmt.Sprintf("%s%020d%s", segPrefix, first, segSuffix) }

// listSegments returns the segment names in dir, oldest first.
func listSegments(dir string) ([]string, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var names []string
	for _, e := range ents {
		n := e.Name()
		if !e.Type().IsRegular() || !strings.HasPrefix(n, segPrefix) || !strings.HasSuffix(n, segSuffix) {
			continue
		}
		if _, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimPrefix(n, segPrefix), segSuffix), 10, 64); err != nil {
			continue
		}
		names = append(names, n)
	}
	slices.Sort(names)
	return names, nil
}

// segment is what the writer keeps of each segment on disk.
type segment struct {
	name    string
	first   uint64
	created time.Time
	// prevSeq and prevMAC are from its header: the previous segment's last record.
	prevSeq uint64
	prevMAC string
}

// readHeader reads a segment's first record (one line: bounded time however long the segment).
func readHeader(path string) (segment, error) {
	s := segment{name: filepath.Base(path)}
	f, err := os.Open(path)
	if err != nil {
		return s, err
	}
	defer f.Close()
	raw, err := readLine(bufio.NewReader(f))
	if err != nil {
		return s, fmt.Errorf("audit segment %s: no whole first record: %v", s.name, err)
	}
	var m meta
	if err := json.Unmarshal(raw, &m); err != nil || m.Seq == nil {
		return s, fmt.Errorf("audit segment %s: malformed first record", s.name)
	}
	s.first, s.created = *m.Seq, m.Time
	if m.Type == EventAuditSegment && m.Chain != nil {
		s.prevSeq, s.prevMAC = m.Chain.PrevSeq, m.Chain.PrevMAC
	}
	return s, nil
}

// lockDir takes an exclusive lock on the stream's directory: two writers would fork the chain.
func lockDir(dir string) (*os.File, error) {
	f, err := os.OpenFile(filepath.Join(dir, lockName), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("audit lock: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		return nil, fmt.Errorf("audit directory %s is in use by another process: %w", dir, err)
	}
	return f, nil
}

// syncDir makes a created or removed segment's directory entry durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// ReadAll returns a stream directory's segments, oldest first, as one text: for tools and tests
// that scan the whole stream (for a leaked canary, say).
func ReadAll(dir string) ([]byte, error) {
	names, err := listSegments(dir)
	if err != nil {
		return nil, err
	}
	var out []byte
	for _, n := range names {
		b, err := os.ReadFile(filepath.Join(dir, n))
		if err != nil {
			return nil, err
		}
		out = append(out, b...)
	}
	return out, nil
}
