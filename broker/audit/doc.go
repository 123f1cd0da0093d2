// Package audit implements broker.Auditor: one JSON record per request on a dedicated, never-sampled
// zap core, each record chained to the previous one by an HMAC so that a modified, reordered or
// deleted record is detected. Shared by keyward-broker and keyward-kms: one audit stream.
//
// It may import the standard library, package broker and zap.
package audit
