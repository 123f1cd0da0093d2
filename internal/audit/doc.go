// Package audit is Keyward's one audit stream, shared by keyward-broker and keyward-kms: Event (one
// struct; its JSON tags are the file schema), the Auditor interface every component records through,
// and Log, the file writer — one JSON line per record, each chained to the previous one by an HMAC so
// that a modified, reordered or deleted record is detected — with Verify and Query to read it back.
//
// It may import the standard library and internal/fault.
package audit
