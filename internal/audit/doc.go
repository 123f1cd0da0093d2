// Package audit is Keyward's one audit stream, shared by keyward-broker and keyward-kms: Event (one
// struct; its JSON tags are the file schema), the Auditor interface every component records through,
// and Log, the writer of a stream — a directory of segments of JSON lines, each record chained to the
// previous one by an HMAC under the node's key, from a genesis bound to node and stream, with
// checkpoints of the chain head for a second sink — with VerifyDir, Query and the checkpoint reader
// to check and read it back, and the daemons' audit flags.
//
// It may import the standard library and internal/fault.
package audit
