// Package audit is Keyward's one audit stream, shared by keyward-broker and keyward-kms: Event (one
// struct; its JSON tags are the file schema), the Auditor interface every component records through,
// and Log, the writer of a stream — a directory of segments of JSON lines, each record chained to the
// previous one by an HMAC under the node's key, from a genesis bound to node and stream, with
// checkpoints of the chain head for a second sink, optionally signed by a signer the daemon passes in
// (keyward-kms: a key in its HSM) without ever waiting on it (checkpoint.go) — with VerifyDir, Query,
// the checkpoint reader and signature check to check and read it back, Cursor and Log.Durable to follow
// it live from the segment files (the writer never waits for a reader: follow.go), ChainVerifier to
// check records one at a time as a subscriber receives them, and the daemons' audit flags.
//
// It may import the standard library and internal/fault.
package audit
