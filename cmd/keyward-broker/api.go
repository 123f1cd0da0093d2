package main

import (
	"context"
	"errors"

	"go.uber.org/zap"

	"github.com/keyward/keyward/internal/apiserver"
	"github.com/keyward/keyward/internal/version"
)

// serveAPI serves Keyward's API (the node's broker audit stream and the read-only Admin service)
// when --api-address is set, until ctx ends; the function returned waits for it to stop.
func (d *wiring) serveAPI(ctx context.Context) (wait func(), err error) {
	if !d.o.API.Enabled() {
		return func() {}, nil
	}
	srv, err := apiserver.Listen(d.o.API, d.log.Named("api"))
	if err != nil {
		return nil, err
	}
	as, err := apiserver.NewAuditServer(apiserver.AuditOptions{Stream: d.audit, Done: ctx.Done()})
	if err != nil {
		return nil, err
	}
	as.Register(srv.GRPC)
	apiserver.NewAdminServer(d.adminOptions()).Register(srv.GRPC)
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := srv.Serve(ctx, d.o.Grace); err != nil {
			d.log.Error("API stopped", zap.Error(err))
		}
	}()
	d.log.Info("serving Keyward's API", zap.Stringer("api", d.o.API), zap.String("listening", srv.Addr().String()))
	return func() { <-done }, nil
}

// adminOptions are the Admin service's sources: plain values, never a secret, token or accessor.
func (d *wiring) adminOptions() apiserver.AdminOptions {
	return apiserver.AdminOptions{Node: d.o.NodeID, Component: "broker", Version: version.Version,
		Volumes: func() []apiserver.Volume {
			var out []apiserver.Volume
			leases := d.src.VolumeLeases()
			for _, v := range d.node.LiveVolumes() {
				av := apiserver.Volume{ID: v.VolumeID, Namespace: v.Pod.Namespace, Pod: v.Pod.PodName, PodUID: v.Pod.PodUID,
					ServiceAccount: v.Pod.ServiceAccount, Environment: v.Environment, Refs: v.Refs, Version: v.Version, Since: v.Since, LastAt: v.Last}
				for _, l := range leases[v.VolumeID] {
					av.Leases = append(av.Leases, apiserver.Lease{Name: l.Name, SHA256: l.Hash, Serial: l.Serial, TTL: l.TTL, Expires: l.Expires})
				}
				out = append(out, av)
			}
			return out
		},
		VaultTokens: func() (string, []apiserver.VaultToken) {
			var out []apiserver.VaultToken
			for _, t := range d.src.TokenInfos() {
				out = append(out, apiserver.VaultToken{AccessorSHA256: t.AccessorSHA256, Namespace: t.Namespace, ServiceAccount: t.ServiceAccount,
					Role: t.Role, Environment: t.Environment, Issued: t.Issued, TTL: t.TTL, Renewable: t.Renewable, Holders: t.Holders})
			}
			return string(d.src.Mode()), out
		},
		Policy: func() (uint64, string) { return d.authz.Generation(), d.authz.Policy().Hash() },
		Health: func() []apiserver.Check {
			c := d.checks()
			synced := error(nil)
			if !c.synced() {
				synced = errors.New("namespace informer not synced")
			}
			out := []apiserver.Check{{Name: "namespaces", Err: synced}, {Name: "audit", Err: c.audit()}, {Name: "sockets", Err: c.livez()}}
			if c.registration != nil {
				out = append(out, apiserver.Check{Name: "kubelet-registration", Err: c.registration()})
			}
			return out
		},
	}
}
