// Package pkcs11 implements kms.KeyWrapper over a PKCS#11 HSM with github.com/miekg/pkcs11: AES-256-GCM
// inside the HSM under non-extractable key objects, a bounded session pool with recovery, and key
// generations for rotation. It is the only cgo package of Keyward.
//
// It may import the standard library, package kms and miekg/pkcs11.
package pkcs11
