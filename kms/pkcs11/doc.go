// Package pkcs11 implements kms.KeyWrapper over a PKCS#11 HSM with github.com/miekg/pkcs11: AES-256-GCM
// inside the HSM under non-extractable key objects (gcm.go: the ciphertext format and the one
// mechanism builder), a bounded session pool with recovery (module.go, pool.go), key generations for
// rotation (keys.go) and their administration for keywardctl (admin.go), its own configuration
// (config.go), and the one mapping of CKR_* values to internal/fault (errors.go). It is the only
// package of Keyward that links cgo.
//
// It may import the standard library, package kms, internal/fault, internal/config, zap and
// miekg/pkcs11.
package pkcs11
