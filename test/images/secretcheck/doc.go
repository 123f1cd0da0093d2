// Command secretcheck is the program of the keyward/secretcheck test-workload image that the real-node
// e2e runs in pods with a secrets.keyward.dev volume. It proves, from inside the pod, that the
// directory given by -dir is a tmpfs mount point (statfs f_type and /proc/self/mountinfo), that the
// mount is read-only (ST_RDONLY, the mount's own "ro" option, and access(W_OK) failing with EROFS;
// for a non-root user the permission bits are checked first, so EACCES), that each -expect
// NAME=VALUE file holds exactly VALUE, and that each -expect-env VAR=FILE environment variable holds
// exactly the content of FILE in -dir (keyward-env's e2e: no value in the pod spec). Its verdict is
// one JSON line on stdout and in the termination message (-termination-log, /dev/termination-log by
// default): file and variable names and sizes, nothing derived from a value (the termination message
// is in the pod's status); it exits 0 on "pass" and 1 on "fail".
// -timeout keeps checking (every -poll) until the verdict passes, for rotation; -hold keeps the
// container running after the verdict until SIGTERM or SIGINT.
//
// It may import the standard library only (it is built static, CGO_ENABLED=0).
package main
