// Package pkcs11 implements kms.KeyWrapper over a PKCS#11 HSM with github.com/miekg/pkcs11: AES-256-GCM
// inside the HSM (gcm.go: the ciphertext format, the one mechanism builder, and the IV read back from
// the mechanism parameters for HSMs that generate their own), a bounded session pool with recovery
// whose waits on hung calls are bounded (module.go, pool.go), key generations for rotation and the
// vetting that accepts only keys generated in the HSM and never exposed, refusing the rest and saying
// why (keys.go), the ECDSA P-256 key generated in the HSM that signs keyward-kms's audit checkpoints,
// vetted the same way (checkpoint.go), their administration for keywardctl (admin.go), its own
// configuration (config.go), and the one mapping of CKR_* values to internal/fault (errors.go). It is
// the only package of Keyward that links cgo (its tests also build testdata/hsmshim.c, a
// fault-injecting PKCS#11 module).
//
// It may import the standard library, package kms, internal/fault, internal/config, zap and
// miekg/pkcs11.
package pkcs11
