package audit

import (
	"context"
	"sync"
)

// Memory is an Auditor that keeps its records in memory, for tests and tools. Record fails with Err
// (after keeping the record) when Err is set.
type Memory struct {
	mu  sync.Mutex
	evs []Event
	Err error
}

var _ Auditor = (*Memory)(nil)

// Record keeps ev.
func (m *Memory) Record(_ context.Context, ev Event) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.evs = append(m.evs, ev)
	return m.Err
}

// Events returns a copy of the records kept so far.
func (m *Memory) Events() []Event {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]Event(nil), m.evs...)
}
