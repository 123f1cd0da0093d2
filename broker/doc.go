// Package broker is Keyward's domain core: who is asking (Identity), for what (SecretRef), the answer
// (Secret, Decision), the sentinel errors every backend wraps, the small interfaces the backends
// implement (Authenticator, Authorizer, SecretSource, Auditor) and Service, which runs
// authenticate -> authorize -> fetch -> audit for one request.
//
// It may import the standard library only. It never imports gRPC, CSI, KMS or proto packages, nor its
// own sub-packages; internal/archtest holds that line.
package broker
