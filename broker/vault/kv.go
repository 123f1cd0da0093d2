package vault

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
	"unicode"
	"unicode/utf16"
	"unicode/utf8"

	"golang.org/x/sync/errgroup"

	"github.com/keyward/keyward/broker"
	"github.com/keyward/keyward/internal/fault"
)

// Fetch reads each ref's key from KV v2, up to 8 reads at a time; refs in the same secret share one
// read. All refs are in one environment (the pod's), so one Vault token serves them all. The
// responses together may hold at most broker.AnswerBudget(maxBytes, reads), and the values returned
// at most maxBytes: beyond that the fetch stops reading and fails with fault.ErrTooLarge.
func (s *Source) Fetch(ctx context.Context, id broker.Identity, jwt broker.Token, refs []broker.Resolved, maxBytes int64) ([]broker.Secret, error) {
	out, used, err := s.fetchAll(ctx, id, jwt, refs, maxBytes)
	if err != nil && errors.Is(err, fault.ErrDenied) && s.o.Mode == ModePod {
		// The cached Vault token may have been revoked (or Vault restarted): forget it (only it: a
		// concurrent request may have logged in afresh meanwhile), revoke it in case Vault still knows
		// it (best effort), and log in once more.
		if old := s.forget(id, refs, used); len(old) > 0 {
			s.revokeUnleased(ctx, old)
		}
		out, _, err = s.fetchAll(ctx, id, jwt, refs, maxBytes)
	}
	return out, err
}

// read is one KV v2 read and the refs it answers.
type read struct {
	ref  broker.Resolved // the first ref: mount, path, version
	refs []int           // indexes of the refs it answers
}

// fetchAll fetches refs; it also returns the Vault tokens it used.
func (s *Source) fetchAll(ctx context.Context, id broker.Identity, jwt broker.Token, refs []broker.Resolved, maxBytes int64) ([]broker.Secret, map[string]bool, error) {
	var reads []*read
	byKey := map[string]*read{}
	for i, r := range refs {
		k := r.Role + "\x00" + r.Mount + "\x00" + r.Path + "\x00" + strconv.Itoa(r.Version)
		if rd := byKey[k]; rd != nil {
			rd.refs = append(rd.refs, i)
			continue
		}
		rd := &read{ref: r, refs: []int{i}}
		byKey[k] = rd
		reads = append(reads, rd)
	}
	b := &budget{}
	b.body.Store(broker.AnswerBudget(maxBytes, len(reads)))
	b.values.Store(maxBytes)
	out := make([]broker.Secret, len(refs))
	used := map[string]bool{}
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(8)
	var err error
	for _, rd := range reads {
		var tok string
		if tok, err = s.token(ctx, id, jwt, rd.ref); err != nil {
			break // reads already started are still waited for below: none outlives the request
		}
		used[tok] = true
		g.Go(func() error { return s.read(gctx, tok, rd, refs, out, b) })
	}
	if werr := g.Wait(); err == nil {
		err = werr
	}
	if err != nil {
		for i := range out {
			clear(out[i].Value)
		}
		return nil, used, err
	}
	return out, used, nil
}

// budget is what a fetch may still read: response bytes and value bytes.
type budget struct{ body, values atomic.Int64 }

// kvResponse is the body of a KV v2 read. The values are views into the response body, not copies:
// the requested ones are decoded into fresh buffers and the body is zeroed after.
type kvResponse struct {
	Data *struct {
		Data     map[string]rawView `json:"data"`
		Metadata struct {
			Version int `json:"version"`
		} `json:"metadata"`
	} `json:"data"`
}

// rawView keeps the JSON of a value as a slice of the input json.Unmarshal decodes: no copy.
type rawView []byte

func (r *rawView) UnmarshalJSON(b []byte) error { *r = b; return nil }

func (s *Source) read(ctx context.Context, token string, rd *read, refs []broker.Resolved, out []broker.Secret, b *budget) error {
	r := rd.ref
	var q map[string][]string
	if r.Version > 0 {
		q = map[string][]string{"version": {strconv.Itoa(r.Version)}}
	}
	// The client's configured timeout applies (RawRequestWithContext sets it).
	start := time.Now()
	resp, err := s.client(token).Logical().ReadRawWithDataWithContext(ctx, r.Mount+"/data/"+r.Path, q)
	if resp != nil {
		defer resp.Body.Close()
	}
	if err != nil {
		err = mapErr("read "+r.Ref, err)
	}
	s.observe("read", start, err)
	if err != nil {
		return err
	}
	body, err := readBounded(resp.Body, resp.ContentLength, &b.body)
	if err != nil {
		if errors.Is(err, errTooLarge) {
			return fmt.Errorf("secret %s: Vault's answer is larger than the volume can take: %w", r.Ref, fault.ErrTooLarge)
		}
		return fmt.Errorf("secret %s: reading Vault's answer: %v: %w", r.Ref, err, fault.ErrUnavailable)
	}
	a := answer{body: body}
	err = a.extract(rd, refs, out, b)
	a.done(err == nil)
	return err
}

// answer is one KV v2 answer whose values are decoded in place: they stay in body, the rest of which
// is zeroed when the answer is done (all of it on failure), so the answer is never held twice.
type answer struct {
	body []byte
	keep [][2]int // the values' ranges in body
}

// extract decodes the answer and sets out[i] for each ref rd answers; refs reading the same key share
// one value.
func (a *answer) extract(rd *read, refs []broker.Resolved, out []broker.Secret, b *budget) error {
	r := rd.ref
	var kv kvResponse
	if err := json.Unmarshal(a.body, &kv); err != nil {
		return fmt.Errorf("secret %s: undecodable answer from Vault: %w", r.Ref, fault.ErrUnavailable)
	}
	if kv.Data == nil || kv.Data.Data == nil {
		return fmt.Errorf("secret %s was deleted or is not KV v2: %w", r.Ref, fault.ErrNotFound)
	}
	decoded := map[string][]byte{}
	for _, i := range rd.refs {
		key := refs[i].Key
		v, seen := decoded[key]
		if !seen {
			raw, ok := kv.Data.Data[key]
			if !ok {
				return fmt.Errorf("secret %s has no key %q: %w", r.Ref, key, fault.ErrNotFound)
			}
			var err error
			if v, err = a.value(raw, b); err != nil {
				return fmt.Errorf("secret %s key %q: %w", r.Ref, key, err)
			}
			decoded[key] = v
		}
		out[i] = broker.Secret{Ref: refs[i].SecretRef, Version: kv.Data.Metadata.Version, Value: v}
	}
	return nil
}

// value decodes one value in place, within the values' budget, and keeps its range.
func (a *answer) value(raw []byte, b *budget) ([]byte, error) {
	v, ok := decodeInPlace(raw)
	if !ok {
		return nil, fmt.Errorf("undecodable value: %w", fault.ErrUnavailable)
	}
	if b.values.Add(-int64(len(v))) < 0 {
		return nil, fmt.Errorf("the values are larger than the volume: %w", fault.ErrTooLarge)
	}
	// v is a prefix of raw, a view of body that encoding/json hands out up to body's end; checked,
	// so that a decoder handing out capped views cannot make the zeroing hit the value instead of
	// the rest.
	off := cap(a.body) - cap(v)
	if len(v) > 0 && (off < 0 || off+len(v) > len(a.body) || &a.body[off] != &v[0]) {
		return nil, fmt.Errorf("the value is not where it was read: %w", fault.ErrUnavailable)
	}
	a.keep = append(a.keep, [2]int{off, off + len(v)})
	return v, nil
}

// done zeroes what the answer holds besides its values (everything, if it failed).
func (a *answer) done(ok bool) {
	if ok {
		clearExcept(a.body, a.keep)
	} else {
		clear(a.body)
	}
}

// clearExcept zeroes b outside the kept ranges.
func clearExcept(b []byte, keep [][2]int) {
	sort.Slice(keep, func(i, j int) bool { return keep[i][0] < keep[j][0] })
	at := 0
	for _, k := range keep {
		if k[0] > at {
			clear(b[at:k[0]])
		}
		at = max(at, k[1])
	}
	clear(b[at:])
}

var errTooLarge = errors.New("over budget")

// chunk is the unit answers are read in; chunks are pooled and zeroed before they go back.
const chunk = 64 << 10

var chunks = sync.Pool{New: func() any { b := make([]byte, chunk); return &b }}

// readBounded reads r whole while the shared budget lasts, into one buffer of exactly its size:
// read in pooled chunks (zeroed after use) and copied once, so no outgrown copy of the answer is
// left for the garbage collector and the peak is twice the answer, not three times.
func readBounded(r io.Reader, contentLength int64, left *atomic.Int64) ([]byte, error) {
	if contentLength > left.Load() {
		return nil, errTooLarge
	}
	var parts []*[]byte
	var lens []int
	total := 0
	defer func() {
		for _, p := range parts {
			clear(*p)
			chunks.Put(p)
		}
	}()
	for {
		p := chunks.Get().(*[]byte)
		n, err := io.ReadFull(r, *p)
		parts, lens = append(parts, p), append(lens, n)
		total += n
		if left.Add(-int64(n)) < 0 {
			return nil, errTooLarge
		}
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			break
		}
		if err != nil {
			return nil, err
		}
	}
	out := make([]byte, total)
	at := 0
	for i, p := range parts {
		at += copy(out[at:], (*p)[:lens[i]])
	}
	return out, nil
}

// decodeInPlace turns the JSON of a KV value into the file's bytes, in the value's own bytes: a
// string's characters (decoded over its literal, which is never shorter), anything else (a number, a
// boolean, an object) its JSON text as Vault sent it. ok is false for a string that is not valid
// UTF-8 JSON (Vault's encoder never sends one).
func decodeInPlace(raw []byte) ([]byte, bool) {
	if len(raw) == 0 || raw[0] != '"' {
		return raw, len(raw) > 0
	}
	if !utf8.Valid(raw) {
		return nil, false // U+FFFD replacements would be longer than what they replace
	}
	return unquote(raw[:0], raw)
}

// unquote appends the decoded JSON string literal s to dst, as encoding/json decodes it (invalid
// surrogate escapes and invalid UTF-8 become U+FFFD), without going through an immutable Go string
// that could not be zeroed. dst may be s[:0] when s is valid UTF-8: the output never overtakes the
// input. ok is false for anything that is not a well-formed string literal.
func unquote(dst, s []byte) ([]byte, bool) {
	if len(s) < 2 || s[0] != '"' || s[len(s)-1] != '"' {
		return nil, false
	}
	s = s[1 : len(s)-1]
	out := dst
	for i := 0; i < len(s); {
		c := s[i]
		switch {
		case c == '"' || c < 0x20:
			return nil, false
		case c == '\\':
			var ok bool
			if out, i, ok = unescape(out, s, i); !ok {
				return nil, false
			}
		case c < utf8.RuneSelf:
			out = append(out, c)
			i++
		default:
			r, size := utf8.DecodeRune(s[i:])
			out = utf8.AppendRune(out, r) // invalid UTF-8 becomes U+FFFD, as encoding/json does
			i += size
		}
	}
	return out, true
}

// unescape decodes the escape sequence at s[i] (a backslash), appends it to out and returns the
// index after it. Everything it appends is read first.
func unescape(out, s []byte, i int) ([]byte, int, bool) {
	if i+1 >= len(s) {
		return nil, 0, false
	}
	switch e := s[i+1]; e {
	case '"', '\\', '/':
		return append(out, e), i + 2, true
	case 'b':
		return append(out, '\b'), i + 2, true
	case 'f':
		return append(out, '\f'), i + 2, true
	case 'n':
		return append(out, '\n'), i + 2, true
	case 'r':
		return append(out, '\r'), i + 2, true
	case 't':
		return append(out, '\t'), i + 2, true
	case 'u':
		r := hex4(s[i+2:])
		if r < 0 {
			return nil, 0, false
		}
		i += 6
		if utf16.IsSurrogate(r) {
			r2 := rune(-1)
			if i+1 < len(s) && s[i] == '\\' && s[i+1] == 'u' {
				r2 = hex4(s[i+2:])
			}
			if dec := utf16.DecodeRune(r, r2); dec != unicode.ReplacementChar {
				i += 6
				r = dec
			} else {
				r = unicode.ReplacementChar
			}
		}
		return utf8.AppendRune(out, r), i, true
	default:
		return nil, 0, false
	}
}

// hex4 decodes the four hex digits at the start of s, or returns -1.
func hex4(s []byte) rune {
	if len(s) < 4 {
		return -1
	}
	var r rune
	for _, c := range s[:4] {
		switch {
		case '0' <= c && c <= '9':
			c -= '0'
		case 'a' <= c && c <= 'f':
			c = c - 'a' + 10
		case 'A' <= c && c <= 'F':
			c = c - 'A' + 10
		default:
			return -1
		}
		r = r*16 + rune(c)
	}
	return r
}
