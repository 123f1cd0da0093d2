package csi

import (
	"context"
	"fmt"
	"os"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"go.uber.org/zap"

	"github.com/keyward/keyward/broker"
	"github.com/keyward/keyward/internal/audit"
	"github.com/keyward/keyward/internal/fault"
	"github.com/keyward/keyward/internal/grpcserver"
)

// NodeUnpublishVolume scrubs the files, unmounts the tmpfs and removes the directory. Idempotent. The
// target path is checked as for a publish before anything is touched.
func (s *Server) NodeUnpublishVolume(ctx context.Context, req *csipb.NodeUnpublishVolumeRequest) (*csipb.NodeUnpublishVolumeResponse, error) {
	breq := broker.Request{RequestID: req.GetVolumeId(), Event: audit.EventUnmount}
	switch {
	case req.GetVolumeId() == "" || req.GetTargetPath() == "":
		return nil, s.refuse(ctx, breq, fmt.Errorf("volume_id and target_path are required: %w", fault.ErrInvalid))
	}
	if err := CheckTarget(s.o.KubeletDir, req.GetTargetPath(), ""); err != nil {
		return nil, s.refuse(ctx, breq, err)
	}
	unlock := s.lock(req.GetVolumeId())
	defer unlock()
	s.unpublished(req.GetVolumeId())
	start := time.Now()
	scrubErr, err := s.o.Mounter.Unmount(req.GetTargetPath(), MaxSizeLimit)
	if scrubErr != nil {
		s.o.Log.Warn("unpublish: the volume held objects the driver did not make; unmounted anyway", zap.String("volume_id", req.GetVolumeId()), zap.Error(scrubErr))
	}
	if err == nil {
		if rerr := os.Remove(req.GetTargetPath()); rerr != nil && !os.IsNotExist(rerr) {
			err = rerr
		}
	}
	ev := audit.Event{Time: start, RequestID: req.GetVolumeId(), Type: audit.EventUnmount, Reason: "unpublished " + req.GetTargetPath(),
		LatencyMS: audit.Millis(time.Since(start))}
	ev.Outcome(err)
	if aerr := s.o.Auditor.Record(ctx, ev); aerr != nil {
		s.o.Log.Error("audit record for an unpublish not written", zap.Error(aerr))
	}
	if err != nil {
		return nil, grpcserver.Status(fmt.Errorf("unpublishing: %w", err))
	}
	s.o.Credentials.unpublished(req.GetVolumeId(), req.GetTargetPath())
	return &csipb.NodeUnpublishVolumeResponse{}, nil
}
