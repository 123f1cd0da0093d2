package main

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/keyward/keyward/internal/metricsserver"
)

// checks are what the broker's health answers are made of.
type checks struct {
	// synced reports whether the namespace informer has synced; audit is the audit log's health.
	synced func() bool
	audit  func() error
	// registration is kubelet's last word on the plugin registration (nil: registration off).
	registration func() error
	// sockets must accept connections while the process is alive: the CSI socket kubelet calls and
	// the registration socket (their files go if someone empties kubelet's plugin directories).
	sockets []string
}

// ready is the CSI Probe's answer: nil when the broker can decide (namespaces known, records written).
func (c checks) ready() error {
	if !c.synced() {
		return errors.New("namespace informer not synced")
	}
	return c.audit() // every publish needs its record written
}

// healthz is ready, and kubelet has not refused the registration.
func (c checks) healthz() error {
	if err := c.ready(); err != nil {
		return err
	}
	if c.registration != nil {
		return c.registration()
	}
	return nil
}

// livez is nil while the sockets kubelet uses accept connections: a restart is the remedy when not.
func (c checks) livez() error {
	for _, p := range c.sockets {
		conn, err := net.DialTimeout("unix", p, time.Second)
		if err != nil {
			return fmt.Errorf("socket %s: %w", p, err)
		}
		conn.Close()
	}
	return nil
}

// handle serves /healthz and /livez on mux: 200 "ok", or 503 and why not.
func (c checks) handle(mux *http.ServeMux) { metricsserver.HandleHealth(mux, c.healthz, c.livez) }
