package kmstest

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/keyward/keyward/internal/fault"
	"github.com/keyward/keyward/kms"
)

// Subject is one KeyWrapper under test with the operator actions the suite needs.
type Subject struct {
	Wrapper kms.KeyWrapper
	// Rotate adds a key generation and makes Wrapper use it; it returns the new key ID.
	Rotate func(t *testing.T) string
	// Retire removes a generation and makes Wrapper forget it.
	Retire func(t *testing.T, keyID string)
	// Reopen closes Wrapper and returns a new one over the same keys (a plugin restart).
	Reopen func(t *testing.T) kms.KeyWrapper
}

// Run runs the KeyWrapper contract. newSubject must return a fresh, independent subject per call.
func Run(t *testing.T, newSubject func(t *testing.T) Subject) {
	t.Run("RoundTrip", func(t *testing.T) { roundTrip(t, newSubject) })
	t.Run("FreshIVPerCall", func(t *testing.T) { freshIVPerCall(t, newSubject) })
	t.Run("BadInputIsInvalid", func(t *testing.T) { badInputIsInvalid(t, newSubject) })
	t.Run("RotationAndReplay", func(t *testing.T) { rotationAndReplay(t, newSubject) })
	t.Run("StableAcrossRestart", func(t *testing.T) { stableAcrossRestart(t, newSubject) })
	t.Run("Concurrent", func(t *testing.T) { concurrent(t, newSubject) })
}

func testContext(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return c
}

func newSeed() []byte {
	b := make([]byte, 32)
	rand.Read(b)
	return b
}

// RoundTrip: what Wrap seals, Unwrap opens under the key ID Wrap named, the current one; the ciphertext is small and never holds the plaintext; Health works.
func roundTrip(t *testing.T, newSubject func(t *testing.T) Subject) {
	s, c := newSubject(t), testContext(t)
	pt := newSeed()
	ct, id, err := s.Wrapper.Wrap(c, pt)
	if err != nil {
		t.Fatal(err)
	}
	cur, err := s.Wrapper.KeyID(c)
	if err != nil || id != cur || id == "" {
		t.Fatalf("Wrap key ID %q, KeyID %q (%v)", id, cur, err)
	}
	if len(id) > kms.MaxKeyID {
		t.Fatalf("key ID of %d bytes", len(id))
	}
	if len(ct) > 128 || bytes.Contains(ct, pt) {
		t.Fatalf("ciphertext of %d bytes for a 32-byte seed, or it contains the plaintext", len(ct))
	}
	got, err := s.Wrapper.Unwrap(c, ct, id)
	if err != nil || !bytes.Equal(got, pt) {
		t.Fatalf("Unwrap = %x, %v", got, err)
	}
	if err := s.Wrapper.Health(c); err != nil {
		t.Fatalf("Health of a working wrapper: %v", err)
	}
}

// FreshIVPerCall: two encryptions of one plaintext differ.
func freshIVPerCall(t *testing.T, newSubject func(t *testing.T) Subject) {
	s, c := newSubject(t), testContext(t)
	pt := newSeed()
	a, _, err := s.Wrapper.Wrap(c, pt)
	if err != nil {
		t.Fatal(err)
	}
	b, _, err := s.Wrapper.Wrap(c, pt)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(a, b) {
		t.Fatal("two encryptions of the same plaintext are equal")
	}
}

// BadInputIsInvalid: malformed, tampered, replayed or oversized input is fault.ErrInvalid and leaves the wrapper working.
func badInputIsInvalid(t *testing.T, newSubject func(t *testing.T) Subject) {
	s, c := newSubject(t), testContext(t)
	ct, id, err := s.Wrapper.Wrap(c, newSeed())
	if err != nil {
		t.Fatal(err)
	}
	flip := func(i int) []byte {
		b := bytes.Clone(ct)
		b[i] ^= 0x01
		return b
	}
	cases := map[string]struct {
		ct []byte
		id string
	}{
		"empty":            {nil, id},
		"one byte":         {ct[:1], id},
		"truncated tag":    {ct[:len(ct)-1], id},
		"version flipped":  {flip(0), id},
		"iv flipped":       {flip(3), id},
		"body flipped":     {flip(len(ct) / 2), id},
		"tag flipped":      {flip(len(ct) - 1), id},
		"unknown key ID":   {ct, id + "x"},
		"empty key ID":     {ct, ""},
		"oversized":        {bytes.Repeat([]byte{1}, 4096), id},
		"garbage same len": {bytes.Repeat([]byte{1}, len(ct)), id},
	}
	for name, tc := range cases {
		if _, err := s.Wrapper.Unwrap(c, tc.ct, tc.id); !errors.Is(err, fault.ErrInvalid) {
			t.Errorf("%s: err = %v, want ErrInvalid", name, err)
		}
	}
	for _, pt := range [][]byte{nil, {}, make([]byte, kms.MaxPlaintext+1)} {
		if _, _, err := s.Wrapper.Wrap(c, pt); !errors.Is(err, fault.ErrInvalid) {
			t.Errorf("Wrap(%d bytes): err = %v, want ErrInvalid", len(pt), err)
		}
	}
	// Bad input must not break the wrapper.
	if _, _, err := s.Wrapper.Wrap(c, newSeed()); err != nil {
		t.Fatalf("after bad input: %v", err)
	}
}

// RotationAndReplay: after a rotation the new key encrypts, the old one still decrypts, a ciphertext replayed under another key ID fails, and a retired key decrypts nothing.
func rotationAndReplay(t *testing.T, newSubject func(t *testing.T) Subject) {
	s, c := newSubject(t), testContext(t)
	pt := newSeed()
	oldCT, oldID, err := s.Wrapper.Wrap(c, pt)
	if err != nil {
		t.Fatal(err)
	}
	newID := s.Rotate(t)
	if newID == oldID {
		t.Fatal("rotation reused the key ID")
	}
	if cur, _ := s.Wrapper.KeyID(c); cur != newID {
		t.Fatalf("KeyID after rotation = %q, want %q", cur, newID)
	}
	newCT, id, err := s.Wrapper.Wrap(c, pt)
	if err != nil || id != newID {
		t.Fatalf("Wrap after rotation: id %q, %v", id, err)
	}
	if got, err := s.Wrapper.Unwrap(c, oldCT, oldID); err != nil || !bytes.Equal(got, pt) {
		t.Fatalf("old ciphertext under the old key: %v", err)
	}
	if got, err := s.Wrapper.Unwrap(c, newCT, newID); err != nil || !bytes.Equal(got, pt) {
		t.Fatalf("new ciphertext: %v", err)
	}
	// A ciphertext replayed under another existing key ID must fail authentication.
	if _, err := s.Wrapper.Unwrap(c, oldCT, newID); !errors.Is(err, fault.ErrInvalid) {
		t.Fatalf("old ciphertext replayed under the new key ID: %v", err)
	}
	if _, err := s.Wrapper.Unwrap(c, newCT, oldID); !errors.Is(err, fault.ErrInvalid) {
		t.Fatalf("new ciphertext replayed under the old key ID: %v", err)
	}
	s.Retire(t, oldID)
	if _, err := s.Wrapper.Unwrap(c, oldCT, oldID); !errors.Is(err, fault.ErrInvalid) {
		t.Fatalf("retired key still decrypts: %v", err)
	}
	if _, err := s.Wrapper.Unwrap(c, newCT, newID); err != nil {
		t.Fatalf("retiring the old key broke the new one: %v", err)
	}
}

// StableAcrossRestart: a reopened wrapper has the same key ID and decrypts what the old one encrypted.
func stableAcrossRestart(t *testing.T, newSubject func(t *testing.T) Subject) {
	s, c := newSubject(t), testContext(t)
	pt := newSeed()
	ct, id, err := s.Wrapper.Wrap(c, pt)
	if err != nil {
		t.Fatal(err)
	}
	w := s.Reopen(t)
	if cur, err := w.KeyID(c); err != nil || cur != id {
		t.Fatalf("key ID after restart %q (%v), want %q", cur, err, id)
	}
	if got, err := w.Unwrap(c, ct, id); err != nil || !bytes.Equal(got, pt) {
		t.Fatalf("Unwrap after restart: %v", err)
	}
}

// Concurrent: concurrent round trips all succeed.
func concurrent(t *testing.T, newSubject func(t *testing.T) Subject) {
	s, c := newSubject(t), testContext(t)
	var wg sync.WaitGroup
	errs := make(chan error, 32)
	for range 32 {
		wg.Go(func() {
			for range 20 {
				pt := newSeed()
				ct, id, err := s.Wrapper.Wrap(c, pt)
				if err == nil {
					var got []byte
					got, err = s.Wrapper.Unwrap(c, ct, id)
					if err == nil && !bytes.Equal(got, pt) {
						err = errors.New("round trip changed the plaintext")
					}
				}
				if err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}
