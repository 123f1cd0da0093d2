package kmstest

import (
	"context"
	"errors"
	"testing"

	"github.com/keyward/keyward/internal/fault"
	"github.com/keyward/keyward/kms"
)

func TestMemoryContract(t *testing.T) {
	Run(t, func(t *testing.T) Subject {
		m := NewMemory()
		return Subject{
			Wrapper: m,
			Rotate:  func(*testing.T) string { return m.Rotate() },
			Retire:  func(_ *testing.T, id string) { m.Retire(id) },
			Reopen:  func(*testing.T) kms.KeyWrapper { return m },
		}
	})
}

func TestMemoryOutage(t *testing.T) {
	m := NewMemory()
	m.SetUnavailable(true)
	if _, _, err := m.Wrap(context.Background(), []byte("x")); !errors.Is(err, fault.ErrUnavailable) {
		t.Fatalf("Wrap during outage: %v", err)
	}
	m.SetUnavailable(false)
	if _, _, err := m.Wrap(context.Background(), []byte("x")); err != nil {
		t.Fatal(err)
	}
}
