package apiserver

import (
	"errors"
	"fmt"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/keyward/keyward/internal/audit"
	"github.com/keyward/keyward/internal/grpcserver"
)

// errBehind: a subscriber that did not take records for the stall timeout, or one refused for too
// many subscribers; resume names the first record it was not sent (0: the oldest record on disk, the
// start it asked for).
type errBehind struct {
	resume uint64
	why    string
}

func (e *errBehind) Error() string {
	if e.resume == 0 {
		return fmt.Sprintf("%s; resume from the oldest record on disk (no from_seq)", e.why)
	}
	return fmt.Sprintf("%s; resume with from_seq %d", e.why, e.resume)
}

// errAhead: a start beyond the stream's newest record.
type errAhead struct{ want, head uint64 }

func (e *errAhead) Error() string {
	return fmt.Sprintf("from_seq %d is beyond the stream's newest record, %d", e.want, e.head)
}

// errMismatch: a checkpoint that is not the record on disk at its seq.
var errMismatch = errors.New("checkpoint does not match the stream")

// errNotServed: an RPC the daemon has no source for (keyward-kms has no volumes).
var errNotServed = errors.New("not served by this daemon")

// toStatus is the API's one map from errors to gRPC codes: the stream's own conditions first,
// then Keyward's error classes (grpcserver.Status).
func toStatus(err error) error {
	var pruned *audit.PrunedError
	var behind *errBehind
	var ahead *errAhead
	switch {
	case err == nil:
		return nil
	case errors.As(err, &pruned):
		return status.Errorf(codes.OutOfRange, "%v; resume with from_seq %d", err, pruned.Oldest)
	case errors.As(err, &ahead):
		return status.Error(codes.OutOfRange, err.Error())
	case errors.As(err, &behind):
		return status.Error(codes.ResourceExhausted, err.Error())
	case errors.Is(err, errMismatch):
		return status.Error(codes.FailedPrecondition, err.Error())
	case errors.Is(err, errNotServed):
		return status.Error(codes.Unimplemented, err.Error())
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	return grpcserver.Status(err)
}
