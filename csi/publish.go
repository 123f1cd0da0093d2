package csi

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"go.uber.org/zap"
	"google.golang.org/grpc/status"

	"github.com/keyward/keyward/broker"
	"github.com/keyward/keyward/csi/podevents"
	"github.com/keyward/keyward/csi/tmpfs"
	"github.com/keyward/keyward/internal/audit"
	"github.com/keyward/keyward/internal/fault"
	"github.com/keyward/keyward/internal/grpcserver"
)

// NodePublishVolume mounts a tmpfs at the target path and writes the pod's secrets into it. Called
// again for a published volume (requiresRepublish, with a fresh token), it authenticates and
// authorizes again: if access is withdrawn for certain (the policy denies it, or the pod is gone) it
// clears the files; any other failure keeps them, and kubelet retries; allowed, it swaps the files
// in only if they changed. Every refusal is audited, whatever stage refused it.
func (s *Server) NodePublishVolume(ctx context.Context, req *csipb.NodePublishVolumeRequest) (*csipb.NodePublishVolumeResponse, error) {
	start := time.Now()
	result, err := s.nodePublish(ctx, req)
	if s.o.Events != nil && (result == ResultRefused || result == ResultWithdrawn) {
		c := claimedPod(req.GetVolumeContext())
		s.o.Events.Denied(podevents.Pod{Namespace: c.Namespace, Name: c.PodName, UID: c.PodUID}, status.Convert(err).Message())
	}
	if s.o.Observer != nil {
		s.o.Observer.Published(Publish{Result: result, Code: status.Code(err).String(), Duration: time.Since(start)})
	}
	if err != nil {
		return nil, err
	}
	return &csipb.NodePublishVolumeResponse{}, nil
}

// nodePublish is NodePublishVolume; it also says what the call did.
func (s *Server) nodePublish(ctx context.Context, req *csipb.NodePublishVolumeRequest) (PublishResult, error) {
	breq := broker.Request{RequestID: req.GetVolumeId() + "/" + nonce(), Event: audit.EventMount, Claimed: claimedPod(req.GetVolumeContext())}
	vol, gid, err := s.checkPublish(req)
	if err != nil {
		return failed(err), s.refuse(ctx, breq, err)
	}
	breq.Claimed, breq.Token, breq.Refs, breq.MaxBytes = vol.Claimed, vol.Token, vol.Refs(), vol.SizeLimit
	unlock := s.lock(req.GetVolumeId())
	defer unlock()
	release, err := s.o.Limiter.acquire(ctx, vol.Weight())
	if err != nil {
		return failed(err), s.refuse(ctx, breq, err)
	}
	defer release()
	published, err := s.o.Mounter.Published(req.GetTargetPath())
	if err != nil {
		err = fmt.Errorf("inspecting the target: %v: %w", err, fault.ErrUnavailable)
		return failed(err), s.refuse(ctx, breq, err)
	}
	breq.Published, breq.Volume = published, req.GetVolumeId()
	if published {
		breq.Environment = s.deliveredEnvironment(req.GetVolumeId())
		if breq.Environment == "" && vol.Dynamic() { // a restart: the volume's metadata names its leases
			breq.Adopt = s.deliveredLeases(req.GetVolumeId(), req.GetTargetPath(), vol.SizeLimit)
		}
	}
	podUID := vol.Claimed.PodUID
	s.o.Credentials.begin(podUID)
	holdsFiles := published // whether the volume holds the pod's files when this call ends
	defer func() { s.o.Credentials.end(req.GetVolumeId(), podUID, holdsFiles) }()
	holdsFiles, err = s.serve(ctx, req.GetVolumeId(), req.GetTargetPath(), breq, vol, gid)
	switch {
	case err == nil && published:
		return ResultRepublished, nil
	case err == nil:
		return ResultPublished, nil
	case published && !holdsFiles:
		return ResultWithdrawn, grpcserver.Status(err)
	}
	return failed(err), grpcserver.Status(err)
}

// failed is the result of a publish that ended with err: refused or failed.
func failed(err error) PublishResult {
	if fault.ClassOf(err).Refusal() {
		return ResultRefused
	}
	return ResultFailed
}

// serve fetches the pod's secrets and delivers them, or clears a published volume whose access was
// withdrawn. It reports whether the volume holds the pod's files when it returns.
func (s *Server) serve(ctx context.Context, volumeID, target string, breq broker.Request, vol Volume, gid int) (bool, error) {
	secrets, err := s.o.Broker.Fetch(ctx, breq)
	if err != nil {
		if !breq.Published || !errors.Is(err, fault.ErrWithdrawn) {
			return breq.Published, err // anything short of a certain withdrawal keeps the files
		}
		if cerr := s.clear(volumeID, target, vol.SizeLimit); cerr != nil {
			s.o.Log.Error("clearing a withdrawn volume failed", zap.String("volume_id", volumeID), zap.Error(cerr))
			return true, err
		}
		return false, err
	}
	defer clearValues(secrets) // the bytes, not just the slices: nothing of the values is left for the GC
	p, err := vol.render(secrets, gid)
	if err != nil {
		// The fetch was audited as allowed; what the pod gets is this refusal: audited too (same
		// request ID), so the audit does not show a delivery that did not happen.
		if aerr := s.o.Broker.Refuse(ctx, breq, err); aerr != nil {
			s.o.Log.Error("audit record for a refused request not written", zap.Error(aerr))
		}
		return breq.Published, err // a republish keeps the files it has
	}
	defer p.clear()
	env, what := environmentOf(secrets), delivered(secrets)
	if breq.Published {
		rot, err := s.update(volumeID, target, vol.SizeLimit, p, gid, env, what)
		if err != nil {
			return true, fmt.Errorf("updating the files: %w", err)
		}
		if rot != nil && s.o.Events != nil {
			c := vol.Claimed
			s.o.Events.Rotated(podevents.Pod{Namespace: c.Namespace, Name: c.PodName, UID: c.PodUID}, rot.version, rot.changes)
		}
		s.deliveredTo(volumeID, vol.Claimed)
		return true, nil
	}
	if err := s.publish(volumeID, target, vol.SizeLimit, p, gid, env, what); err != nil {
		return false, fmt.Errorf("publishing: %w", err)
	}
	s.deliveredTo(volumeID, vol.Claimed)
	return true, nil
}

// checkPublish validates a publish request before anything is fetched or mounted.
func (s *Server) checkPublish(req *csipb.NodePublishVolumeRequest) (Volume, int, error) {
	switch {
	case req.GetVolumeId() == "":
		return Volume{}, 0, fmt.Errorf("volume_id is required: %w", fault.ErrInvalid)
	case req.GetTargetPath() == "":
		return Volume{}, 0, fmt.Errorf("target_path is required: %w", fault.ErrInvalid)
	case req.GetVolumeCapability() == nil:
		return Volume{}, 0, fmt.Errorf("volume_capability is required: %w", fault.ErrInvalid)
	case req.GetVolumeCapability().GetBlock() != nil:
		return Volume{}, 0, fmt.Errorf("block volumes are not supported: %w", fault.ErrInvalid)
	case !req.GetReadonly():
		return Volume{}, 0, fmt.Errorf("the volume must be read-only: set readOnly: true on the CSI volume in the pod spec (a writable volume would let the pod change what the driver reads back): %w", fault.ErrInvalid)
	}
	vol, err := ParseVolume(req.GetVolumeContext(), req.GetSecrets(), s.o.Audience)
	if err != nil {
		return Volume{}, 0, err
	}
	if err := CheckTarget(s.o.KubeletDir, req.GetTargetPath(), vol.Claimed.PodUID); err != nil {
		return Volume{}, 0, err
	}
	gid := -1
	if g := req.GetVolumeCapability().GetMount().GetVolumeMountGroup(); g != "" {
		n, err := strconv.Atoi(g)
		if err != nil || n < 0 {
			return Volume{}, 0, fmt.Errorf("volume_mount_group %q is not a group ID: %w", g, fault.ErrInvalid)
		}
		gid = n
	}
	return vol, gid, nil
}

// clearValues zeroes the secrets' values.
func clearValues(secrets []broker.Secret) {
	for _, sec := range secrets {
		clear(sec.Value)
	}
}

// environmentOf is the environment secrets were read from: one, the pod's namespace's ("" if they
// disagree, which the broker never returns).
func environmentOf(secrets []broker.Secret) string {
	env := ""
	for i, sec := range secrets {
		if i > 0 && sec.Environment != env {
			return ""
		}
		env = sec.Environment
	}
	return env
}

func dirMode(gid int) os.FileMode {
	if gid >= 0 {
		return 0o750
	}
	return 0o755
}

// publish mounts and writes; on any failure it leaves no mount and no file behind.
func (s *Server) publish(volumeID, target string, size int64, p payload, gid int, env string, what VersionDoc) (err error) {
	files := p.files
	created := false
	if err := os.Mkdir(target, 0o750); err == nil {
		created = true
	} else if !errors.Is(err, os.ErrExist) {
		return err
	}
	mounted := false
	defer func() {
		if err == nil {
			return
		}
		if mounted {
			if _, uerr := s.o.Mounter.Unmount(target, size); uerr != nil {
				s.o.Log.Error("cleanup after a failed publish: unmount", zap.String("target", target), zap.Error(uerr))
			}
		}
		if created {
			os.Remove(target)
		}
	}()
	if err := s.o.Mounter.Mount(target, tmpfs.MountOptions{Size: tmpfs.SizeFor(size, len(files)), Mode: dirMode(gid), GID: gid, AllowSwap: s.o.AllowSwap}); err != nil {
		return err
	}
	mounted = true
	v, err := s.o.Mounter.Open(target, size)
	if err != nil {
		return err
	}
	defer v.Close()
	ver := what
	ver.Version = 1
	vf := ver.file()
	if err := v.Swap(append(files[:len(files):len(files)], vf), gid, dirMode(gid)); err != nil {
		return err
	}
	s.swapped(volumeID, v, s.digest(p, gid), env, ver, vf)
	return nil
}
