package audit

import (
	"bufio"
	"bytes"
	"crypto/hmac"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"
)

// Report is the result of Verify.
type Report struct {
	// Records is the number of records that verified, in order.
	Records uint64
	// Line is the 1-based line of the first problem (0 if none).
	Line int
	// Problem describes the first broken, reordered or missing record ("" if none).
	Problem string
	head    []byte
}

// OK reports whether every record verified.
func (r Report) OK() bool { return r.Problem == "" }

// Verify reads a whole audit file and checks the sequence and hash chain of every record. It stops
// at the first problem. The error is for I/O failures only; a tampered file gives a Report with a
// Problem.
func Verify(r io.Reader, key []byte) (Report, error) {
	var rep Report
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64*1024), 1<<20)
	line := 0
	for sc.Scan() {
		line++
		raw := sc.Bytes()
		fail := func(format string, args ...any) (Report, error) {
			rep.Line, rep.Problem = line, fmt.Sprintf("line %d: ", line)+fmt.Sprintf(format, args...)
			return rep, nil
		}
		i := bytes.LastIndex(raw, []byte(macField))
		if i < 0 || !bytes.HasSuffix(raw, []byte(`"}`)) {
			return fail("not an audit record (no mac)")
		}
		body := raw[:i]
		got, err := hex.DecodeString(string(raw[i+len(macField) : len(raw)-2]))
		if err != nil {
			return fail("malformed mac")
		}
		var head struct {
			Seq *uint64 `json:"seq"`
		}
		if err := json.Unmarshal(append(append([]byte{}, body...), '}'), &head); err != nil || head.Seq == nil {
			return fail("malformed record")
		}
		switch want := rep.Records + 1; {
		case *head.Seq > want:
			return fail("records %d..%d are missing", want, *head.Seq-1)
		case *head.Seq < want:
			return fail("record %d is out of order or repeated (expected %d)", *head.Seq, want)
		}
		if !hmac.Equal(got, chainMAC(key, rep.head, body)) {
			return fail("record %d was modified (mac does not match the chain)", *head.Seq)
		}
		rep.Records++
		rep.head = got
	}
	if err := sc.Err(); err != nil {
		return rep, err
	}
	return rep, nil
}

// ErrTampered is returned by VerifyFile when the chain is broken.
var ErrTampered = errors.New("audit log does not verify")

// VerifyFile verifies the file at path with the key in keyFile.
func VerifyFile(path, keyFile string) (Report, error) {
	key, err := ReadKey(keyFile)
	if err != nil {
		return Report{}, err
	}
	f, err := os.Open(path)
	if err != nil {
		return Report{}, err
	}
	defer f.Close()
	rep, err := Verify(f, key)
	if err != nil {
		return rep, err
	}
	if !rep.OK() {
		return rep, fmt.Errorf("%w: %s", ErrTampered, strings.TrimSpace(rep.Problem))
	}
	return rep, nil
}

// Filter selects records; zero fields match everything.
type Filter struct {
	Decision, Namespace, Event string
	Since                      time.Time
}

// Query reads records from r and returns those matching f, in file order. It does not verify the
// chain (run Verify for that).
func Query(r io.Reader, f Filter) ([]Record, error) {
	var out []Record
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64*1024), 1<<20)
	line := 0
	for sc.Scan() {
		line++
		var rec Record
		if err := json.Unmarshal(sc.Bytes(), &rec); err != nil {
			return nil, fmt.Errorf("line %d: %w", line, err)
		}
		if (f.Decision != "" && string(rec.Decision) != f.Decision) || (f.Namespace != "" && rec.Subject.Namespace != f.Namespace) ||
			(f.Event != "" && string(rec.Type) != f.Event) || (!f.Since.IsZero() && rec.Time.Before(f.Since)) {
			continue
		}
		out = append(out, rec)
	}
	return out, sc.Err()
}
