package vault

import (
	"bytes"
	"encoding/json"
	"errors"
	"math/rand/v2"
	"strings"
	"sync/atomic"
	"testing"
	"unicode/utf8"
)

// unquote must decode every JSON string literal exactly as encoding/json does: it replaces
// json.Unmarshal into a string (which could not be zeroed) on the value path.
func TestUnquoteAgreesWithEncodingJSON(t *testing.T) {
	cases := []string{``, `a`, `pässwörd`, "tab\there", `quote " and \ slash /`, "\x00\x01\x1f", `<>&`, "\u2028\u2029",
		"emoji 😀", "\xff\xfe invalid utf-8", `\u`, strings.Repeat("x", 70000)}
	raw := []string{`"\ud83d\ude00"`, `"\ud83d"`, `"\ude00\ud83d"`, `"\ud83dx"`, `"\u00e9\u00E9"`, `"\/\b\f\n\r\t"`, `"\ud83d\u0041"`}
	r := rand.New(rand.NewPCG(1, 2))
	for range 2000 {
		b := make([]byte, r.IntN(40))
		for i := range b {
			b[i] = byte(r.IntN(256))
		}
		cases = append(cases, string(b))
	}
	for _, c := range cases {
		enc, _ := json.Marshal(c)
		raw = append(raw, string(enc))
	}
	for _, in := range raw {
		var want string
		if err := json.Unmarshal([]byte(in), &want); err != nil {
			t.Fatalf("test input %q is not JSON: %v", in, err)
		}
		got, ok := unquote(nil, []byte(in))
		if !ok || string(got) != want {
			t.Fatalf("unquote(%q) = %q, %v; encoding/json: %q", in, got, ok, want)
		}
		if !utf8.Valid(got) {
			t.Fatalf("unquote(%q) is not valid UTF-8", in)
		}
		// In place, over the literal itself, as the source decodes values (Vault sends valid UTF-8).
		if utf8.ValidString(in) {
			buf := []byte(in)
			got, ok := decodeInPlace(buf)
			if !ok || string(got) != want || (len(got) > 0 && &got[0] != &buf[0]) {
				t.Fatalf("decodeInPlace(%q) = %q, %v; encoding/json: %q", in, got, ok, want)
			}
		}
	}
	for _, bad := range []string{`"abc`, `abc"`, `"a\x"`, `"a\u12"`, `"a"b"`, "\"a\nb\"", `1`, `{}`} {
		if _, ok := unquote(nil, []byte(bad)); ok {
			t.Fatalf("unquote accepted %q", bad)
		}
	}
}

func TestDecodeValueKeepsOtherJSONAsText(t *testing.T) {
	for in, want := range map[string]string{`"s3cr3t"`: "s3cr3t", `12345678901234567890`: "12345678901234567890", `true`: "true",
		`{"a":1}`: `{"a":1}`, `null`: "null"} {
		if got, ok := decodeInPlace([]byte(in)); !ok || string(got) != want {
			t.Errorf("decodeInPlace(%s) = %q, want %q", in, got, want)
		}
	}
	if _, ok := decodeInPlace([]byte("\"a\xffb\"")); ok {
		t.Error("decodeInPlace accepted a string that is not UTF-8 (its U+FFFD would overrun the input)")
	}
}

// A value decoded in place keeps its bytes; everything else of the answer is zeroed.
func TestClearExceptKeepsOnlyTheValues(t *testing.T) {
	b := []byte("aaVALUEbbbSECONDcc")
	clearExcept(b, [][2]int{{10, 16}, {2, 7}})
	if string(b) != "\x00\x00VALUE\x00\x00\x00SECOND\x00\x00" {
		t.Fatalf("%q", b)
	}
}

// readBounded stops at the shared budget: a huge answer is never read whole.
func TestReadBoundedStopsAtTheBudget(t *testing.T) {
	var left atomic.Int64
	left.Store(100_000)
	body := bytes.Repeat([]byte("a"), 60_000)
	got, err := readBounded(bytes.NewReader(body), -1, &left)
	if err != nil || !bytes.Equal(got, body) || left.Load() != 40_000 || cap(got) != len(body) {
		t.Fatalf("first read: %d bytes, %v, %d left", len(got), err, left.Load())
	}
	n := &countingReader{r: endless{}} // an answer that never ends
	if _, err := readBounded(n, -1, &left); !errors.Is(err, errTooLarge) {
		t.Fatalf("over budget: %v", err)
	}
	if n.n > 40_000+chunk {
		t.Fatalf("read %d bytes of an answer with 40 000 left in the budget", n.n)
	}
	left.Store(10)
	n = &countingReader{r: bytes.NewReader(body)}
	if _, err := readBounded(n, int64(len(body)), &left); !errors.Is(err, errTooLarge) || n.n != 0 {
		t.Fatalf("a Content-Length over the budget: %v after reading %d bytes", err, n.n)
	}
}

type countingReader struct {
	r interface{ Read([]byte) (int, error) }
	n int
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += n
	return n, err
}

type endless struct{}

func (endless) Read(p []byte) (int, error) {
	for i := range p {
		p[i] = 'b'
	}
	return len(p), nil
}
