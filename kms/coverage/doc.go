// Package coverage reports how the objects kube-apiserver stores in etcd are encrypted: per KMS v2
// key ID, how many are wrapped under it, and which are not KMS v2 encrypted at all. It reads etcd
// directly (keys only as needed, values never decrypted) with a client certificate.
//
// It may import the standard library, kms/envelope and the etcd client (tests: the harness and the
// apiserver's EncryptedObject type).
package coverage
