// Package render turns a pod's secrets into the shape its app reads: a file rendered from several
// keys with a restricted text/template (Template), and certificate bundles converted between PEM and
// PKCS#12 (Convert).
//
// A Template is checked when it is parsed, before anything is fetched: every value it reads is named
// statically (.NAME.KEY, $.NAME.KEY or index .NAME "KEY"), so the caller knows every ref and key to
// authorize; it calls only the documented functions (Funcs), none of which reaches a file, the
// environment or the network; it has no range, template, define or block, so its run is linear in
// its length. Execution is bounded: its output (a limit per call) and what its functions may
// allocate together. Errors never hold a value: parse errors quote the template (the pod's own
// text), execution errors say where and which function refused, never with what.
//
// It may import the standard library, internal/fault and software.sslmate.com/src/go-pkcs12.
package render
