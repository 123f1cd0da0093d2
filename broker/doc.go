// Package broker is Keyward's secrets-broker domain: who is asking (Identity), for what (SecretRef,
// with its validation), the answer (Resolved, Secret), the small interfaces the backends implement
// (Authenticator, Authorizer, SecretSource, PodChecker, PodReleaser) and Service, which runs
// authenticate -> authorize -> fetch -> audit for one request and rate-limits the records of refusals.
//
// It may import the standard library and the shared kernel only: internal/fault (errors) and
// internal/audit (the audit stream). It never imports gRPC, CSI, KMS, client-go or proto packages,
// nor its own sub-packages; internal/archtest holds that line.
package broker
