package kmstest

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/keyward/keyward/internal/fault"
	"github.com/keyward/keyward/kms"
)

// Memory is an in-memory kms.KeyWrapper with key generations, for fault injection and benchmarks.
type Memory struct {
	mu      sync.RWMutex
	gens    []memKey
	down    atomic.Bool
	version byte
}

type memKey struct {
	id   string
	aead cipher.AEAD
}

var _ kms.KeyWrapper = (*Memory)(nil)

// NewMemory returns a Memory with one key generation.
func NewMemory() *Memory {
	m := &Memory{version: 1}
	m.Rotate()
	return m
}

// Rotate adds a generation, which becomes the current key, and returns its ID.
func (m *Memory) Rotate() string {
	k := make([]byte, 32)
	id := make([]byte, 8)
	rand.Read(k)
	rand.Read(id)
	block, _ := aes.NewCipher(k)
	aead, _ := cipher.NewGCM(block)
	m.mu.Lock()
	defer m.mu.Unlock()
	key := memKey{id: fmt.Sprintf("memory.%d.%s", len(m.gens)+1, hex.EncodeToString(id)), aead: aead}
	m.gens = append(m.gens, key)
	return key.id
}

// Retire forgets a generation.
func (m *Memory) Retire(keyID string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for i, k := range m.gens {
		if k.id == keyID {
			m.gens = append(m.gens[:i:i], m.gens[i+1:]...)
			return
		}
	}
}

// SetUnavailable makes every call fail with fault.ErrUnavailable (an HSM outage) until reset.
func (m *Memory) SetUnavailable(down bool) { m.down.Store(down) }

func (m *Memory) aad(keyID string) []byte { return append([]byte{m.version}, keyID...) }

// Wrap encrypts under the newest generation.
func (m *Memory) Wrap(_ context.Context, plaintext []byte) ([]byte, string, error) {
	if m.down.Load() {
		return nil, "", fmt.Errorf("memory: injected outage: %w", fault.ErrUnavailable)
	}
	if len(plaintext) == 0 || len(plaintext) > kms.MaxPlaintext {
		return nil, "", fmt.Errorf("plaintext of %d bytes: %w", len(plaintext), fault.ErrInvalid)
	}
	m.mu.RLock()
	k := m.gens[len(m.gens)-1]
	m.mu.RUnlock()
	out := make([]byte, 1+12, 1+12+len(plaintext)+16)
	out[0] = m.version
	rand.Read(out[1:13])
	return k.aead.Seal(out, out[1:13], plaintext, m.aad(k.id)), k.id, nil
}

// Unwrap decrypts.
func (m *Memory) Unwrap(_ context.Context, ciphertext []byte, keyID string) ([]byte, error) {
	if m.down.Load() {
		return nil, fmt.Errorf("memory: injected outage: %w", fault.ErrUnavailable)
	}
	if len(ciphertext) < 1+12+16+1 || ciphertext[0] != m.version {
		return nil, fmt.Errorf("malformed ciphertext: %w", fault.ErrInvalid)
	}
	m.mu.RLock()
	var k *memKey
	for i := range m.gens {
		if m.gens[i].id == keyID {
			k = &m.gens[i]
		}
	}
	m.mu.RUnlock()
	if k == nil {
		return nil, fmt.Errorf("unknown key ID %q: %w", keyID, fault.ErrInvalid)
	}
	pt, err := k.aead.Open(nil, ciphertext[1:13], ciphertext[13:], m.aad(keyID))
	if err != nil {
		return nil, fmt.Errorf("ciphertext does not authenticate: %w", fault.ErrInvalid)
	}
	return pt, nil
}

// KeyID returns the newest generation's ID.
func (m *Memory) KeyID(context.Context) (string, error) {
	if m.down.Load() {
		return "", fmt.Errorf("memory: injected outage: %w", fault.ErrUnavailable)
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.gens[len(m.gens)-1].id, nil
}

// Health is a round trip under the current key.
func (m *Memory) Health(ctx context.Context) error {
	pt := []byte("keyward-health-probe-32-bytes!!!")
	ct, id, err := m.Wrap(ctx, pt)
	if err != nil {
		return err
	}
	_, err = m.Unwrap(ctx, ct, id)
	return err
}
