package broker

import (
	"context"
	"time"
)

// EventType names what an audit record is about.
type EventType string

// The audit event types of Keyward's one audit stream.
const (
	EventAuthenticate EventType = "authenticate"
	EventAuthorize    EventType = "authorize"
	EventFetch        EventType = "fetch"
	EventMount        EventType = "mount"
	EventUnmount      EventType = "unmount"
	EventKMSEncrypt   EventType = "kms_encrypt"
	EventKMSDecrypt   EventType = "kms_decrypt"
	EventPolicyReload EventType = "policy_reload"
)

// Decision is the outcome recorded for a request.
type Decision string

// Decisions.
const (
	Allow Decision = "allow"
	Deny  Decision = "deny"
	Error Decision = "error"
)

// Subject is who asked.
type Subject struct {
	Namespace      string
	ServiceAccount string
	Pod            string
	PodUID         string
	Node           string
}

// Object is what was asked for. KeyID is set for KMS operations.
type Object struct {
	Environment string
	Ref         string
	Key         string
	Version     int
	KeyID       string
}

// Event is one audit record. It never carries a secret value or a token.
type Event struct {
	Time      time.Time
	RequestID string
	Type      EventType
	Decision  Decision
	Reason    string
	Subject   Subject
	Object    Object
	// Code is the status code returned to the caller (a gRPC code name such as "OK").
	Code    string
	Latency time.Duration
	// Suppressed counts the refusals of the same pod that were not recorded (rate limit) since its
	// previous record.
	Suppressed int
}

// Auditor records events. An error means the record was not durably accepted and the request it
// describes must be refused (fail closed).
type Auditor interface {
	Record(ctx context.Context, ev Event) error
}
