package audit

import (
	"context"
	"time"

	"github.com/keyward/keyward/internal/fault"
)

// EventType names what a record is about.
type EventType string

// The event types of Keyward's one audit stream.
const (
	EventAuthenticate EventType = "authenticate"
	EventAuthorize    EventType = "authorize"
	EventFetch        EventType = "fetch"
	EventMount        EventType = "mount"
	EventUnmount      EventType = "unmount"
	EventKMSEncrypt   EventType = "kms_encrypt"
	EventKMSDecrypt   EventType = "kms_decrypt"
	EventPolicyReload EventType = "policy_reload"
	// EventKMSKeyRefused: a key object found in the HSM was not accepted as a KEK generation.
	EventKMSKeyRefused EventType = "kms_key_refused"

	// The audit stream's own records (Event.Chain is set): the stream's first record, a process
	// start, a segment's first record, a repaired tail or recovered disk, and deleted old segments.
	EventAuditGenesis   EventType = "audit_genesis"
	EventAuditStart     EventType = "audit_start"
	EventAuditSegment   EventType = "audit_segment"
	EventAuditRecovered EventType = "audit_recovered"
	EventAuditPruned    EventType = "audit_pruned"
)

// Decision is the outcome a record states.
type Decision string

// Decisions: the request was served, refused as such (who asked, what for, how much), or failed.
const (
	Allowed Decision = "allow"
	Denied  Decision = "deny"
	Failed  Decision = "error"
)

// Subject is who asked.
type Subject struct {
	Namespace      string `json:"namespace"`
	ServiceAccount string `json:"service_account"`
	Pod            string `json:"pod"`
	PodUID         string `json:"pod_uid"`
	Node           string `json:"node"`
}

// Object is what was asked for. KeyID is set for KMS operations. Ref and Key list a request's refs
// and keys, comma-separated, in the request's order; Version is the one ref's version (asked for,
// or read when it was allowed). Versions, on an allowed fetch or mount, is the Vault version each
// ref was read at, in the same order (absent from records written before it existed: readers take
// Version for a one-ref record).
type Object struct {
	Environment string `json:"environment"`
	Ref         string `json:"ref"`
	Key         string `json:"key"`
	Version     int    `json:"version"`
	Versions    []int  `json:"versions,omitempty"`
	KeyID       string `json:"key_id"`
	// Leases, on a request for dynamic credentials, says what was done with each lease. Never the
	// lease ID: its hash.
	Leases []Lease `json:"leases,omitempty"`
}

// Lease is a dynamic credential's lease in an audit record.
type Lease struct {
	// Name is the credential's name (broker.LeaseName): "pki:payments_web/api.payments.svc", "database:payments_ro".
	Name string `json:"name"`
	// Action: issued, reused, renewed or reissued.
	Action string `json:"action"`
	// LeaseSHA256 is a prefix of the lease ID's SHA-256, hex.
	LeaseSHA256 string `json:"lease_sha256"`
	// TTLSeconds is the lease's duration when issued or last renewed.
	TTLSeconds int64 `json:"ttl_s"`
	// Serial is a certificate's serial number.
	Serial string `json:"serial,omitempty"`
}

// Event is one audit record; its JSON tags are the file's schema (Log appends "seq" and "mac"). It
// never carries a secret value or a token.
type Event struct {
	Time      time.Time `json:"time"`
	Type      EventType `json:"event"`
	RequestID string    `json:"request_id"`
	Decision  Decision  `json:"decision"`
	Reason    string    `json:"reason"`
	Subject   Subject   `json:"subject"`
	Object    Object    `json:"object"`
	// Code is the status code returned to the caller (the gRPC code name of the error's class).
	Code string `json:"code"`
	// LatencyMS is how long the request took, in milliseconds (see Millis).
	LatencyMS float64 `json:"latency_ms"`
	// Suppressed counts the refusals of the same pod that were not recorded (rate limit) since its
	// previous record.
	Suppressed int `json:"suppressed,omitempty"`
	// Chain is set on the audit stream's own records (the EventAudit* types) only.
	Chain *Chain `json:"chain,omitempty"`
}

// Chain is what the audit stream's own records say about the stream: whose it is, and how it
// continues across processes, segments, crashes and deleted segments. Verify checks every field.
type Chain struct {
	Node   string `json:"node"`
	Stream string `json:"stream"`
	// KeyID names the HMAC key (see KeyID); never the key.
	KeyID string `json:"key_id"`
	// ProcessStart and PID identify the writing process (audit_genesis, audit_start).
	ProcessStart time.Time `json:"process_start,omitzero"`
	PID          int       `json:"pid,omitempty"`
	// PrevSeq and PrevMAC are the previous segment's last record (audit_segment), or the last
	// record of the segment deleted (audit_pruned).
	PrevSeq uint64 `json:"prev_seq,omitempty"`
	PrevMAC string `json:"prev_mac,omitempty"`
	// FirstSeq and Segment name the deleted segment (audit_pruned).
	FirstSeq uint64 `json:"first_seq,omitempty"`
	Segment  string `json:"segment,omitempty"`
	// DroppedBytes and LastGoodSeq describe a partial tail cut back at start (audit_recovered).
	DroppedBytes int64  `json:"dropped_bytes,omitempty"`
	LastGoodSeq  uint64 `json:"last_good_seq,omitempty"`
}

// MaxReason bounds a record's reason (errors may quote a malformed attribute).
const MaxReason = 1024

// Outcome sets the record's decision and code from the request's error (nil: allowed), and for an
// error its reason, bounded. Every component fills records this way.
func (e *Event) Outcome(err error) {
	c := fault.ClassOf(err)
	e.Code = c.String()
	switch {
	case err == nil:
		e.Decision = Allowed
		return
	case c.Refusal():
		e.Decision = Denied
	default:
		e.Decision = Failed
	}
	e.Reason = fault.Truncate(err.Error(), MaxReason)
}

// Millis is a duration as records write it: milliseconds, with microsecond resolution.
func Millis(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// Auditor records events. An error means the record was not durably accepted and the request it
// describes must be refused (fail closed).
type Auditor interface {
	Record(ctx context.Context, ev Event) error
}

// Record is a record as read back from the file: the event and its place in the chain.
type Record struct {
	Event
	Seq uint64 `json:"seq"`
	MAC string `json:"mac"`
}
