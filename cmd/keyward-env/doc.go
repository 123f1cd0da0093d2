// Command keyward-env runs an application with environment variables read from a Keyward secrets
// volume, in memory only: `keyward-env --from /secrets --env DB_PASSWORD=db-password -- app args`.
// Its image is keyward/keyward-env; an init container copies it into an emptyDir with
// `keyward-env install /keyward/bin`. See internal/envexec and the README.
//
// It only wires: it may import internal/envexec and internal/version.
package main
